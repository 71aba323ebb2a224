# The provider-free part of a region's deployment: names, ports, firewall rules and the DNS
# records discovery reads, computed from a region's settings. The AWS module applies them;
# `terraform test` checks them offline (tests/plan.tftest.hcl), and a cargo test checks the
# root configuration's arguments against regions/*.toml.

variable "region" {
  description = "Meridian region id (the `node.region` of regions/<region>.toml)."
  type        = string
  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,30}$", var.region))
    error_message = "A region id is lowercase letters, digits and dashes."
  }
}

variable "nodes" {
  description = "SFU nodes in the region (instances, each with its own Elastic IP)."
  type        = number
  validation {
    condition     = var.nodes >= 1 && var.nodes <= 50 && floor(var.nodes) == var.nodes
    error_message = "A region has 1 to 50 nodes."
  }
}

variable "domain" {
  description = "DNS zone the mesh lives under, e.g. meridian.example.com."
  type        = string
}

variable "media_port" {
  description = "First media port: `rtc.port` of the region file. Worker i listens on media_port + i."
  type        = number
}

variable "media_ports" {
  description = "Media ports per node: one per media worker, i.e. `rtc.workers` or the instance's vCPUs."
  type        = number
  validation {
    condition     = var.media_ports >= 1 && var.media_ports <= 256
    error_message = "1 to 256 media ports."
  }
}

variable "ice_tcp" {
  description = "`rtc.tcp` of the region file: ICE-TCP on the media port numbers."
  type        = bool
}

variable "signaling_port" {
  description = "`signaling.listen` port of the region file: NGINX on 443 forwards to it on loopback."
  type        = number
}

variable "metrics_port" {
  description = "`metrics.listen` port: scraped from the monitoring network only."
  type        = number
}

variable "admin_port" {
  description = "Admin API port (`admin.listen`): reachable from the operator network only."
  type        = number
  default     = 9465
}

variable "pipe_port" {
  description = "QUIC pipe port (`mesh.listen`): reachable from the other mesh nodes only."
  type        = number
  default     = 7100
}

variable "turn_port" {
  description = "coturn's TURN port (UDP and TCP; TLS on 5349), for clients behind strict NATs."
  type        = number
  default     = 3478
}

variable "turn_relay_ports" {
  description = "coturn's relay port range (min-port, max-port in infra/coturn/turnserver.conf)."
  type        = object({ from = number, to = number })
  default     = { from = 49160, to = 49999 }
}

variable "mesh_cidrs" {
  description = "Addresses of every mesh node (other regions' Elastic IPs as /32): the only sources of pipe traffic."
  type        = list(string)
}

variable "operator_cidrs" {
  description = "Operator networks: SSH and the admin API."
  type        = list(string)
}

variable "monitoring_cidrs" {
  description = "Prometheus servers: the metrics port."
  type        = list(string)
}

variable "wire_version" {
  description = "Pipe protocol version published in the TXT records (src/proto/pipe.rs WIRE_VERSION)."
  type        = number
  default     = 4
}

variable "vpc_cidr" {
  description = "The region's VPC block; regions should not overlap (peering, VPN)."
  type        = string
}

variable "announced_ips" {
  description = "Node id => the public address announced in its ICE candidates and pipe Hello (its Elastic IP)."
  type        = map(string)
  validation {
    condition     = alltrue([for ip in values(var.announced_ips) : can(cidrhost("${ip}/32", 0))])
    error_message = "Announced addresses are IPv4 addresses."
  }
}

variable "geoip_file" {
  description = "A GeoLite2/GeoIP2 City file on the node (kept current by geoipupdate); null: the development table."
  type        = string
  default     = null
}
