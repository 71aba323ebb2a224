output "node_names" {
  description = "Node ids, `<region>-<n>` from 1."
  value       = local.node_names
}

output "hostnames" {
  description = "Node id => its DNS name under the mesh zone (A record to its Elastic IP)."
  value       = local.hosts
}

output "srv_name" {
  description = "The SRV name every node resolves (`mesh.discovery.srv_name`)."
  value       = local.srv_name
}

output "srv_records" {
  description = "Node id => SRV record data: priority, weight, pipe port, target."
  value       = { for n, h in local.hosts : n => "10 10 ${var.pipe_port} ${h}." }
}

output "txt_records" {
  description = "Node id => the strings of its TXT record (one attribute each, RFC 1464)."
  value = {
    for n in local.node_names : n => [
      "node=${n}",
      "region=${var.region}",
      "version=${var.wire_version}",
    ]
  }
}

output "ingress" {
  description = "Name => firewall rule (protocol, port range, sources): exactly what a node opens."
  value       = { for r in local.rules : r.name => r if length(r.cidrs) > 0 }
}

output "subnet_cidr" {
  description = "The public subnet of the region's nodes (first /24 of the VPC)."
  value       = cidrsubnet(var.vpc_cidr, 24 - tonumber(split("/", var.vpc_cidr)[1]), 0)
}

output "entry_name" {
  description = "The public entry point, a latency-routed name answering with the region nearest the client."
  value       = "edge.${var.domain}"
}

output "node_config" {
  description = "Node id => its own config file, layered over the region file (`meridian serve --config region.toml --config node.toml`)."
  value = {
    for n, h in local.hosts : n => join("\n", compact([
      "# ${n}: written by Terraform (terraform/modules/plan); the region's settings are in ${var.region}.toml.",
      "[node]",
      "id = \"${n}\"",
      "",
      "[signaling]",
      "listen = \"127.0.0.1:${var.signaling_port}\"",
      "public_url = \"wss://${n}.${var.domain}/v1/ws\"",
      "",
      "[metrics]",
      "listen = \"0.0.0.0:${var.metrics_port}\"",
      "",
      "[rtc]",
      "listen_ip = \"0.0.0.0\"",
      "announced_ip = \"${var.announced_ips[n]}\"",
      "workers = ${var.media_ports}",
      "",
      "[auth]",
      "algorithm = \"EdDSA\"",
      "public_key_file = \"/etc/meridian/token.pub.pem\"",
      "",
      "[mesh]",
      "listen = \"0.0.0.0:${var.pipe_port}\"",
      "advertise = \"${var.announced_ips[n]}:${var.pipe_port}\"",
      "ca_file = \"/etc/meridian/pipe/ca.pem\"",
      "cert_file = \"/etc/meridian/pipe/node.pem\"",
      "key_file = \"/etc/meridian/pipe/node.key\"",
      "",
      "[mesh.discovery]",
      "srv_name = \"${local.srv_name}.\"",
      "",
      "[admin]",
      "listen = \"0.0.0.0:${var.admin_port}\"",
      "token_file = \"/etc/meridian/admin.token\"",
      "",
      "[routing]",
      "trusted_proxies = [\"127.0.0.1/32\"]",
      var.geoip_file == null ? "" : "geoip_file = \"${var.geoip_file}\"",
      "",
      "[turn]",
      "urls = [\"turn:${n}.${var.domain}:${var.turn_port}?transport=udp\", \"turn:${n}.${var.domain}:${var.turn_port}?transport=tcp\", \"turns:${n}.${var.domain}:5349?transport=tcp\"]",
      "secret_file = \"/etc/meridian/turn.secret\"",
      "",
      "[recording]",
      "enabled = true",
      "dir = \"/var/lib/meridian/recordings\"",
      "signing_key_file = \"/var/lib/meridian/recording.key\"",
      "create_signing_key = true",
      "",
    ]))
  }
}
