locals {
  node_names = [for i in range(var.nodes) : "${var.region}-${i + 1}"]
  mesh_zone  = "mesh.${var.domain}"
  # What discovery resolves (src/mesh/discovery.rs): one SRV per node under this name, its
  # target a per-node name with an A record and a TXT record.
  srv_name = "_meridian._udp.${local.mesh_zone}"
  hosts    = { for n in local.node_names : n => "${n}.${local.mesh_zone}" }
  everyone = ["0.0.0.0/0"]

  # Every port a node listens on, with who may reach it. Nothing else is open.
  rules = concat(
    [
      {
        name     = "media-udp"
        protocol = "udp"
        from     = var.media_port
        to       = var.media_port + var.media_ports - 1
        cidrs    = local.everyone
      },
    ],
    var.ice_tcp ? [
      {
        name     = "media-tcp"
        protocol = "tcp"
        from     = var.media_port
        to       = var.media_port + var.media_ports - 1
        cidrs    = local.everyone
      },
    ] : [],
    [
      { name = "https", protocol = "tcp", from = 443, to = 443, cidrs = local.everyone },
      # Certificate issuance (HTTP-01) and the redirect to HTTPS.
      { name = "http", protocol = "tcp", from = 80, to = 80, cidrs = local.everyone },
      { name = "turn-udp", protocol = "udp", from = var.turn_port, to = var.turn_port, cidrs = local.everyone },
      { name = "turn-tcp", protocol = "tcp", from = var.turn_port, to = var.turn_port, cidrs = local.everyone },
      { name = "turns", protocol = "tcp", from = 5349, to = 5349, cidrs = local.everyone },
      { name = "turn-relay", protocol = "udp", from = var.turn_relay_ports.from, to = var.turn_relay_ports.to, cidrs = local.everyone },
      { name = "pipe", protocol = "udp", from = var.pipe_port, to = var.pipe_port, cidrs = var.mesh_cidrs },
      { name = "admin", protocol = "tcp", from = var.admin_port, to = var.admin_port, cidrs = var.operator_cidrs },
      { name = "ssh", protocol = "tcp", from = 22, to = 22, cidrs = var.operator_cidrs },
      { name = "metrics", protocol = "tcp", from = var.metrics_port, to = var.metrics_port, cidrs = var.monitoring_cidrs },
    ],
  )
}
