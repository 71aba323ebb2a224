variable "home_region" {
  description = "AWS region of the Route 53 and shared resources."
  type        = string
  default     = "us-east-1"
}

variable "domain" {
  description = "The hosted zone's name (e.g. meridian.example.com)."
  type        = string
}

variable "zone_id" {
  description = "Route 53 hosted zone id of `domain`."
  type        = string
}

variable "operator_cidrs" {
  description = "Operator networks: SSH and the admin API."
  type        = list(string)
}

variable "monitoring_cidrs" {
  description = "Prometheus servers: the metrics port."
  type        = list(string)
}

variable "amis" {
  description = "Meridian region => Debian 12 AMI id in its AWS region."
  type        = map(string)
}

variable "ssh_key_name" {
  description = "EC2 key pair name (the same name in every AWS region), or null."
  type        = string
  default     = null
}

variable "release_url" {
  description = "HTTPS URL of the meridian release binary."
  type        = string
}

variable "release_sha256" {
  description = "Its SHA-256."
  type        = string
}

variable "pipe_ca_pem" {
  description = "Cluster CA certificate (certs/ca.pem from `meridian ca init`)."
  type        = string
}

variable "pipe_certs" {
  description = "Node id => { cert, key } from `meridian ca issue --node <id> --region <region>`."
  type        = map(object({ cert = string, key = string }))
  sensitive   = true
}

variable "token_public_key_pem" {
  description = "The Ed25519 public key session tokens are signed with."
  type        = string
}

variable "admin_token" {
  description = "Admin API bearer token (`openssl rand -hex 32`)."
  type        = string
  sensitive   = true
}

variable "turn_secret" {
  description = "coturn's shared secret (`openssl rand -hex 32`)."
  type        = string
  sensitive   = true
}

variable "geoip_file" {
  description = "GeoIP City file on the nodes (geoipupdate), or null for the development table."
  type        = string
  default     = null
}
