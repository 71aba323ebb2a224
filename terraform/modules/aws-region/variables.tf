# One Meridian region on AWS: a VPC with a public subnet, a security group opening exactly the
# ports the provider-free plan lists, `nodes` network-optimised instances each with an Elastic
# IP announced in its ICE candidates, cloud-init that installs the binary, the node's pipe
# certificate, the region file and the systemd unit, and the Route 53 records: an A record
# per node, the SRV/TXT records discovery reads, and the region's share of the latency-routed
# public entry point.

variable "region" {
  description = "Meridian region id (regions/<region>.toml)."
  type        = string
}

variable "region_file" {
  description = "Path of the region's config file (regions/<region>.toml)."
  type        = string
}

variable "aws_region" {
  description = "AWS region the nodes run in (e.g. ap-south-1); also the latency record's region."
  type        = string
}

variable "nodes" {
  description = "SFU nodes in the region."
  type        = number
}

variable "instance_type" {
  description = "Network-optimised instance type (c6a/c6in/c5n class). Its vCPUs are the media workers."
  type        = string
  validation {
    condition     = can(regex("^(c6a|c6in|c5n|c6i|c7a|c7i|c7gn)\\.", var.instance_type))
    error_message = "Use a network-optimised compute type (c6a, c6in, c5n, c6i, c7a, c7i, c7gn)."
  }
}

variable "media_ports" {
  description = "Media workers per node: the instance type's vCPUs (or `rtc.workers`)."
  type        = number
}

variable "media_port" {
  description = "`rtc.port` of the region file."
  type        = number
}

variable "ice_tcp" {
  description = "`rtc.tcp` of the region file."
  type        = bool
}

variable "signaling_port" {
  description = "`signaling.listen` port of the region file (NGINX forwards 443 to it)."
  type        = number
}

variable "metrics_port" {
  description = "`metrics.listen` port of the region file."
  type        = number
}

variable "admin_port" {
  description = "Admin API port."
  type        = number
  default     = 9465
}

variable "pipe_port" {
  description = "QUIC pipe port."
  type        = number
  default     = 7100
}

variable "vpc_cidr" {
  description = "The region's VPC block."
  type        = string
}

variable "domain" {
  description = "The Route 53 zone's name (e.g. meridian.example.com)."
  type        = string
}

variable "zone_id" {
  description = "Route 53 hosted zone id of `domain`."
  type        = string
}

variable "mesh_cidrs" {
  description = "Every other mesh node's Elastic IP as /32 (the pipe port is open to them only)."
  type        = list(string)
}

variable "operator_cidrs" {
  description = "Operator networks (SSH, admin API)."
  type        = list(string)
}

variable "monitoring_cidrs" {
  description = "Prometheus servers (metrics port)."
  type        = list(string)
}

variable "ami_id" {
  description = "Debian 12 AMI for the region (amd64 for c6a/c6i/c5n/c7a/c7i; arm64 for c7gn)."
  type        = string
}

variable "ssh_key_name" {
  description = "EC2 key pair for operator SSH; null for none."
  type        = string
  default     = null
}

variable "release_url" {
  description = "HTTPS URL of the meridian binary (a release build of this repository)."
  type        = string
}

variable "release_sha256" {
  description = "SHA-256 of the binary at release_url; the bootstrap refuses another."
  type        = string
  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.release_sha256))
    error_message = "A SHA-256 is 64 lowercase hex digits."
  }
}

variable "pipe_ca_pem" {
  description = "The cluster CA certificate (`meridian ca init`): every node trusts it."
  type        = string
}

variable "pipe_certs" {
  description = "Node id => { cert, key } PEMs from `meridian ca issue --node <id> --region <region>`; stored as SecureString parameters, never in user data."
  type        = map(object({ cert = string, key = string }))
  sensitive   = true
}

variable "token_public_key_pem" {
  description = "The application's Ed25519 public key that signs session tokens."
  type        = string
}

variable "admin_token" {
  description = "The admin API bearer token (at least 32 characters); stored as a SecureString parameter."
  type        = string
  sensitive   = true
}

variable "turn_secret" {
  description = "coturn's static-auth-secret (TURN REST credentials); stored as a SecureString parameter."
  type        = string
  sensitive   = true
}

variable "geoip_file" {
  description = "GeoIP City file path on the nodes (installed by geoipupdate), or null."
  type        = string
  default     = null
}
