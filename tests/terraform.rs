//! The Terraform configuration against what it deploys. Every `.tf` file parses as HCL; each
//! region file in regions/ has a module instance in terraform/main.tf whose arguments mirror
//! it (ports, ICE-TCP, workers); the provider-free plan module, evaluated by the real
//! `terraform` with exactly those arguments, opens exactly the region's ports, writes a node
//! file that the real config loader accepts over the region file, and publishes DNS records
//! that discovery, asking a real DNS server, resolves into the mesh's nodes.
//! `terraform fmt -check` and `terraform test` run too. Terraform's providers are never
//! downloaded: the plan module needs none.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use hcl::{Body, Expression};
use meridian::config::NodeConfig;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tf_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if p.is_dir() && !name.starts_with('.') {
            tf_files(&p, out);
        } else if name.ends_with(".tf") || name.ends_with(".tftest.hcl") {
            out.push(p);
        }
    }
}

fn parse(path: &Path) -> Body {
    let text = std::fs::read_to_string(path).unwrap();
    hcl::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The region files (regions/*.toml).
fn region_files() -> BTreeMap<String, PathBuf> {
    std::fs::read_dir(repo().join("regions"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| (p.file_stem().unwrap().to_string_lossy().into_owned(), p))
        .collect()
}

/// The root configuration's `module "<name>"` blocks, by name.
fn root_modules() -> BTreeMap<String, BTreeMap<String, Expression>> {
    let body = parse(&repo().join("terraform/main.tf"));
    body.blocks()
        .filter(|b| b.identifier() == "module")
        .map(|b| {
            let name = b.labels()[0].as_str().to_owned();
            let attrs = b
                .body()
                .attributes()
                .map(|a| (a.key().to_owned(), a.expr().clone()))
                .collect();
            (name, attrs)
        })
        .collect()
}

fn number(attrs: &BTreeMap<String, Expression>, key: &str) -> u64 {
    match attrs.get(key) {
        Some(Expression::Number(n)) => n.as_u64().unwrap(),
        other => panic!("`{key}` is a number literal, not {other:?}"),
    }
}

fn text(attrs: &BTreeMap<String, Expression>, key: &str) -> String {
    match attrs.get(key) {
        Some(Expression::String(s)) => s.clone(),
        // A template such as "${path.root}/…": its text without the quotes.
        Some(e) => e.to_string().trim_matches('"').to_owned(),
        None => panic!("`{key}` is missing"),
    }
}

fn boolean(attrs: &BTreeMap<String, Expression>, key: &str) -> bool {
    match attrs.get(key) {
        Some(Expression::Bool(b)) => *b,
        other => panic!("`{key}` is a bool literal, not {other:?}"),
    }
}

/// vCPUs of the instance types the AWS module accepts (one media worker each).
fn vcpus(instance_type: &str) -> u64 {
    let size = instance_type.split('.').nth(1).unwrap_or_default();
    match size {
        "large" => 2,
        "xlarge" => 4,
        "2xlarge" => 8,
        "4xlarge" => 16,
        "8xlarge" => 32,
        "9xlarge" => 36,
        "12xlarge" => 48,
        "16xlarge" => 64,
        "18xlarge" => 72,
        other => panic!("unknown instance size {other}"),
    }
}

fn terraform() -> Option<PathBuf> {
    let out = Command::new("terraform").arg("version").output().ok()?;
    out.status.success().then(|| PathBuf::from("terraform"))
}

fn run_tf(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("terraform")
        .args(args)
        .current_dir(dir)
        // Never the network: no provider is needed, and none may be fetched.
        .env("TF_CLI_CONFIG_FILE", "/dev/null")
        .env("CHECKPOINT_DISABLE", "1")
        .env("TF_IN_AUTOMATION", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "terraform {args:?} in {}:\n{stdout}\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn every_terraform_file_parses_as_hcl() {
    let mut files = Vec::new();
    tf_files(&repo().join("terraform"), &mut files);
    assert!(files.len() >= 8, "{files:?}");
    for f in &files {
        parse(f);
    }
}

#[test]
fn every_region_file_has_a_terraform_instance_that_mirrors_it() {
    let modules = root_modules();
    let regions = region_files();
    assert!(!regions.is_empty());
    for (name, path) in &regions {
        let cfg = NodeConfig::load(path).unwrap();
        let m = modules.get(name).unwrap_or_else(|| {
            panic!("terraform/main.tf has no module \"{name}\" for regions/{name}.toml")
        });
        assert_eq!(text(m, "source"), "./modules/aws-region", "{name}");
        assert_eq!(text(m, "region"), cfg.node.region.as_str());
        assert!(
            text(m, "region_file").ends_with(&format!("/../regions/{name}.toml")),
            "{name}: {}",
            text(m, "region_file")
        );
        assert_eq!(
            number(m, "media_port"),
            u64::from(cfg.rtc.port),
            "{name}: rtc.port"
        );
        assert_eq!(boolean(m, "ice_tcp"), cfg.rtc.tcp, "{name}: rtc.tcp");
        assert_eq!(
            number(m, "signaling_port"),
            u64::from(cfg.signaling.listen.port()),
            "{name}: signaling.listen"
        );
        assert_eq!(
            number(m, "metrics_port"),
            u64::from(cfg.metrics.listen.port()),
            "{name}: metrics.listen"
        );
        let workers = cfg
            .rtc
            .workers
            .map(|w| w as u64)
            .unwrap_or_else(|| vcpus(&text(m, "instance_type")));
        assert_eq!(
            number(m, "media_ports"),
            workers,
            "{name}: one port per media worker"
        );
    }
    let extra: Vec<&String> = modules
        .keys()
        .filter(|m| !regions.contains_key(*m))
        .collect();
    assert!(extra.is_empty(), "modules without a region file: {extra:?}");
}

#[test]
fn terraform_fmt_is_clean_and_the_plan_module_tests_pass() {
    let Some(_) = terraform() else {
        eprintln!("terraform is not installed here: `terraform fmt` and `terraform test` not run");
        return;
    };
    run_tf(&repo().join("terraform"), &["fmt", "-check", "-recursive"]);
    let plan = repo().join("terraform/modules/plan");
    // A copy, so the checkout gets no .terraform folder.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&plan, dir.path());
    run_tf(dir.path(), &["init", "-backend=false", "-input=false"]);
    let out = run_tf(dir.path(), &["test", "-no-color"]);
    assert!(out.contains("0 failed"), "{out}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        if p.is_dir() {
            copy_dir(&p, &to.join(&name));
        } else {
            std::fs::copy(&p, to.join(&name)).unwrap();
        }
    }
}

/// The plan module's outputs for one region, evaluated by terraform with the root
/// configuration's own arguments for it.
fn evaluate_plan(name: &str, m: &BTreeMap<String, Expression>, ips: &[String]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let nodes = number(m, "nodes");
    let announced: Vec<String> = (0..nodes as usize)
        .map(|i| format!("\"{name}-{}\" = \"{}\"", i + 1, ips[i]))
        .collect();
    let mut args = String::new();
    for key in [
        "region",
        "nodes",
        "media_port",
        "media_ports",
        "ice_tcp",
        "signaling_port",
        "metrics_port",
        "vpc_cidr",
        "admin_port",
        "pipe_port",
    ] {
        if let Some(e) = m.get(key) {
            args.push_str(&format!("  {key} = {e}\n"));
        }
    }
    let root = format!(
        r#"
module "plan" {{
  source = "{plan}"
{args}
  domain           = "meridian.test"
  mesh_cidrs       = ["198.51.100.0/24"]
  operator_cidrs   = ["203.0.113.0/28"]
  monitoring_cidrs = ["192.0.2.0/28"]
  announced_ips    = {{ {announced} }}
}}

output "plan" {{
  value = {{
    ingress     = module.plan.ingress
    node_config = module.plan.node_config
    srv_name    = module.plan.srv_name
    srv_records = module.plan.srv_records
    txt_records = module.plan.txt_records
    hostnames   = module.plan.hostnames
  }}
}}
"#,
        plan = repo().join("terraform/modules/plan").display(),
        announced = announced.join(", "),
    );
    std::fs::write(dir.path().join("main.tf"), root).unwrap();
    run_tf(dir.path(), &["init", "-input=false"]);
    run_tf(
        dir.path(),
        &["apply", "-auto-approve", "-input=false", "-no-color"],
    );
    let out = run_tf(dir.path(), &["output", "-json", "plan"]);
    serde_json::from_str(&out).unwrap()
}

/// (protocol, first port, last port) of every rule.
fn opened(ingress: &Value) -> BTreeSet<(String, u64, u64)> {
    ingress
        .as_object()
        .unwrap()
        .values()
        .map(|r| {
            (
                r["protocol"].as_str().unwrap().to_owned(),
                r["from"].as_u64().unwrap(),
                r["to"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_region_opens_exactly_its_ports_and_publishes_what_discovery_resolves() {
    let Some(_) = terraform() else {
        eprintln!("terraform is not installed here: the plan module was not evaluated");
        return;
    };
    let modules = root_modules();
    for (name, path) in region_files() {
        let m = &modules[&name];
        let nodes = number(m, "nodes") as usize;
        let ips: Vec<String> = (0..nodes).map(|i| format!("127.0.0.{}", 10 + i)).collect();
        let plan = evaluate_plan(&name, m, &ips);
        let region = NodeConfig::load(&path).unwrap();

        // Each node's own file, over the region file, is a configuration the node accepts;
        // what it listens on is exactly what the firewall opens (signaling stays behind NGINX).
        let dir = tempfile::tempdir().unwrap();
        let mut expected = BTreeSet::new();
        for (i, ip) in ips.iter().enumerate() {
            let node = format!("{name}-{}", i + 1);
            let file = dir.path().join(format!("{node}.toml"));
            std::fs::write(&file, plan["node_config"][&node].as_str().unwrap()).unwrap();
            let cfg = NodeConfig::load_layers(&[path.clone(), file]).unwrap_or_else(|e| {
                panic!("{node}'s file over regions/{name}.toml does not load: {e}")
            });
            assert_eq!(cfg.node_id().as_str(), node);
            assert_eq!(cfg.rtc.announced_ip.to_string(), *ip);
            assert!(
                cfg.signaling.listen.ip().is_loopback(),
                "signaling behind NGINX"
            );
            assert_eq!(cfg.signaling.listen.port(), region.signaling.listen.port());
            let ports = cfg.media_ports();
            let (first, last) = (u64::from(ports[0]), u64::from(*ports.last().unwrap()));
            let mesh = cfg.mesh.as_ref().expect("a mesh section");
            let admin = cfg.admin.as_ref().expect("an admin section");
            let mut mine = BTreeSet::from([
                ("udp".to_owned(), first, last),
                (
                    "udp".to_owned(),
                    u64::from(mesh.listen.port()),
                    u64::from(mesh.listen.port()),
                ),
                (
                    "tcp".to_owned(),
                    u64::from(admin.listen.port()),
                    u64::from(admin.listen.port()),
                ),
                (
                    "tcp".to_owned(),
                    u64::from(cfg.metrics.listen.port()),
                    u64::from(cfg.metrics.listen.port()),
                ),
            ]);
            if cfg.rtc.tcp {
                mine.insert(("tcp".to_owned(), first, last));
            }
            expected.extend(mine);
            assert_eq!(
                mesh.discovery.as_ref().unwrap().srv_name,
                format!("{}.", plan["srv_name"].as_str().unwrap())
            );
        }
        // Beside the node's own ports: HTTPS (and HTTP for certificates), TURN, SSH.
        for (p, a, b) in [
            ("tcp", 443, 443),
            ("tcp", 80, 80),
            ("udp", 3478, 3478),
            ("tcp", 3478, 3478),
            ("tcp", 5349, 5349),
            ("udp", 49160, 49999),
            ("tcp", 22, 22),
        ] {
            expected.insert((p.to_owned(), a, b));
        }
        assert_eq!(opened(&plan["ingress"]), expected, "region {name}");

        // The records, served by a real DNS server, resolve through discovery into the nodes.
        let origin = "meridian.test.";
        let mut records = String::new();
        for (node, srv) in plan["srv_records"].as_object().unwrap() {
            records.push_str(&format!(
                "{}. IN SRV {}\n",
                plan["srv_name"].as_str().unwrap(),
                srv.as_str().unwrap()
            ));
            let host = plan["hostnames"][node].as_str().unwrap();
            let i: usize = node.rsplit('-').next().unwrap().parse().unwrap();
            records.push_str(&format!("{host}. IN A {}\n", ips[i - 1]));
            let txt: Vec<String> = plan["txt_records"][node]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| format!("\"{}\"", s.as_str().unwrap()))
                .collect();
            records.push_str(&format!("{host}. IN TXT {}\n", txt.join(" ")));
        }
        let dns = common::dns::DnsServer::start(origin, &common::dns::zone(origin, &records)).await;
        let resolver = meridian::mesh::discovery::PeerResolver::new(
            &meridian::mesh::discovery::DnsDiscovery {
                name: format!("{}.", plan["srv_name"].as_str().unwrap()),
                servers: vec![dns.addr],
                interval: std::time::Duration::from_secs(5),
            },
        )
        .unwrap();
        let mut peers = resolver.resolve().await.unwrap();
        peers.sort();
        let pipe_port = m.get("pipe_port").map_or(7100, |_| number(m, "pipe_port"));
        let seen: Vec<(String, String, String, u16)> = peers
            .iter()
            .map(|p| {
                (
                    p.node.as_ref().map(|n| n.to_string()).unwrap_or_default(),
                    p.region.as_ref().map(|r| r.to_string()).unwrap_or_default(),
                    p.version.clone().unwrap_or_default(),
                    p.addr.port(),
                )
            })
            .collect();
        let want: Vec<(String, String, String, u16)> = (1..=nodes)
            .map(|i| {
                (
                    format!("{name}-{i}"),
                    name.clone(),
                    meridian::proto::pipe::WIRE_VERSION.to_string(),
                    pipe_port as u16,
                )
            })
            .collect();
        assert_eq!(seen, want, "discovery's view of region {name}");
    }
}
