# Offline checks of the provider-free plan: `terraform init -backend=false && terraform test`.

variables {
  region           = "india"
  nodes            = 2
  domain           = "meridian.example.com"
  media_port       = 40100
  media_ports      = 8
  ice_tcp          = true
  signaling_port   = 7001
  metrics_port     = 9101
  mesh_cidrs       = ["198.51.100.10/32", "198.51.100.20/32"]
  operator_cidrs   = ["203.0.113.0/28"]
  monitoring_cidrs = ["10.90.0.0/24"]
  vpc_cidr         = "10.20.0.0/16"
  announced_ips    = { "india-1" = "198.51.100.1", "india-2" = "198.51.100.2" }
}

run "names_and_discovery_records" {
  command = plan

  assert {
    condition     = join(",", output.node_names) == "india-1,india-2"
    error_message = "nodes are <region>-<n> from 1"
  }
  assert {
    condition     = output.srv_name == "_meridian._udp.mesh.meridian.example.com"
    error_message = "the SRV name discovery resolves"
  }
  assert {
    condition     = output.srv_records["india-2"] == "10 10 7100 india-2.mesh.meridian.example.com."
    error_message = "SRV data: priority, weight, pipe port, the node's host"
  }
  assert {
    condition     = join(" ", output.txt_records["india-1"]) == "node=india-1 region=india version=4"
    error_message = "TXT strings discovery reads"
  }
  assert {
    condition     = output.subnet_cidr == "10.20.0.0/24"
    error_message = "the first /24 of the VPC"
  }
}

run "the_firewall_opens_exactly_the_region_ports" {
  command = plan

  assert {
    condition     = output.ingress["media-udp"].from == 40100 && output.ingress["media-udp"].to == 40107 && output.ingress["media-udp"].protocol == "udp"
    error_message = "one UDP media port per worker"
  }
  assert {
    condition     = output.ingress["media-tcp"].to == 40107 && output.ingress["media-tcp"].protocol == "tcp"
    error_message = "ICE-TCP on the same port numbers"
  }
  assert {
    condition     = join(",", output.ingress["pipe"].cidrs) == "198.51.100.10/32,198.51.100.20/32" && output.ingress["pipe"].from == 7100
    error_message = "the pipe port from mesh nodes only"
  }
  assert {
    condition     = join(",", output.ingress["admin"].cidrs) == "203.0.113.0/28" && join(",", output.ingress["ssh"].cidrs) == "203.0.113.0/28"
    error_message = "admin and SSH from the operator network only"
  }
  assert {
    condition     = join(",", output.ingress["metrics"].cidrs) == "10.90.0.0/24" && output.ingress["metrics"].from == 9101
    error_message = "metrics from the monitoring network only"
  }
  assert {
    condition     = !contains(keys(output.ingress), "signaling")
    error_message = "signaling stays on loopback behind NGINX"
  }
  assert {
    condition     = length(output.ingress) == 12
    error_message = "nothing else is open"
  }
}

run "no_ice_tcp_no_tcp_media_ports" {
  command = plan
  variables {
    ice_tcp = false
  }
  assert {
    condition     = !contains(keys(output.ingress), "media-tcp")
    error_message = "ICE-TCP off opens no TCP media port"
  }
}

run "no_operator_network_no_admin_or_ssh" {
  command = plan
  variables {
    operator_cidrs = []
  }
  assert {
    condition     = !contains(keys(output.ingress), "admin") && !contains(keys(output.ingress), "ssh")
    error_message = "a rule with no sources is not created"
  }
}

run "a_node_config_per_node" {
  command = plan
  assert {
    condition     = strcontains(output.node_config["india-2"], "id = \"india-2\"") && strcontains(output.node_config["india-2"], "announced_ip = \"198.51.100.2\"")
    error_message = "each node's file names it and its address"
  }
  assert {
    condition     = strcontains(output.node_config["india-1"], "srv_name = \"_meridian._udp.mesh.meridian.example.com.\"")
    error_message = "the node resolves the SRV name Terraform publishes"
  }
  assert {
    condition     = strcontains(output.node_config["india-1"], "turn:india-1.meridian.example.com:3478?transport=udp")
    error_message = "the node hands out its own coturn"
  }
}

run "a_bad_region_id_is_refused" {
  command = plan
  variables {
    region = "India West"
  }
  expect_failures = [var.region]
}
