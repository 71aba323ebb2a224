# Meridian's regions on AWS: one module instance per file in ../regions/ (docs/deployment.md,
# "Adding a region"). The arguments that mirror the region file (ports, ICE-TCP) are checked
# against it by tests/terraform.rs; the firewall and DNS records come from modules/plan.
#
# Pipes are open between nodes only: each region opens its pipe port to the other regions'
# Elastic IPs (the module adds its own nodes').

module "india" {
  source    = "./modules/aws-region"
  providers = { aws = aws.india }

  region        = "india"
  region_file   = "${path.root}/../regions/india.toml"
  aws_region    = "ap-south-1"
  nodes         = 2
  instance_type = "c6a.2xlarge"
  media_ports   = 8 # one media worker per vCPU
  vpc_cidr      = "10.20.0.0/16"

  media_port     = 40100
  ice_tcp        = true
  signaling_port = 7001
  metrics_port   = 9101

  mesh_cidrs = concat(module.europe.eip_cidrs, module.us.eip_cidrs)

  domain               = var.domain
  zone_id              = var.zone_id
  operator_cidrs       = var.operator_cidrs
  monitoring_cidrs     = var.monitoring_cidrs
  ami_id               = var.amis["india"]
  ssh_key_name         = var.ssh_key_name
  release_url          = var.release_url
  release_sha256       = var.release_sha256
  pipe_ca_pem          = var.pipe_ca_pem
  pipe_certs           = var.pipe_certs
  token_public_key_pem = var.token_public_key_pem
  admin_token          = var.admin_token
  turn_secret          = var.turn_secret
  geoip_file           = var.geoip_file
}

module "europe" {
  source    = "./modules/aws-region"
  providers = { aws = aws.europe }

  region        = "europe"
  region_file   = "${path.root}/../regions/europe.toml"
  aws_region    = "eu-central-1"
  nodes         = 2
  instance_type = "c6a.2xlarge"
  media_ports   = 8
  vpc_cidr      = "10.21.0.0/16"

  media_port     = 40200
  ice_tcp        = true
  signaling_port = 7002
  metrics_port   = 9102

  mesh_cidrs = concat(module.india.eip_cidrs, module.us.eip_cidrs)

  domain               = var.domain
  zone_id              = var.zone_id
  operator_cidrs       = var.operator_cidrs
  monitoring_cidrs     = var.monitoring_cidrs
  ami_id               = var.amis["europe"]
  ssh_key_name         = var.ssh_key_name
  release_url          = var.release_url
  release_sha256       = var.release_sha256
  pipe_ca_pem          = var.pipe_ca_pem
  pipe_certs           = var.pipe_certs
  token_public_key_pem = var.token_public_key_pem
  admin_token          = var.admin_token
  turn_secret          = var.turn_secret
  geoip_file           = var.geoip_file
}

module "us" {
  source    = "./modules/aws-region"
  providers = { aws = aws.us }

  region        = "us"
  region_file   = "${path.root}/../regions/us.toml"
  aws_region    = "us-east-1"
  nodes         = 2
  instance_type = "c6a.2xlarge"
  media_ports   = 8
  vpc_cidr      = "10.22.0.0/16"

  media_port     = 40300
  ice_tcp        = true
  signaling_port = 7003
  metrics_port   = 9103

  mesh_cidrs = concat(module.india.eip_cidrs, module.europe.eip_cidrs)

  domain               = var.domain
  zone_id              = var.zone_id
  operator_cidrs       = var.operator_cidrs
  monitoring_cidrs     = var.monitoring_cidrs
  ami_id               = var.amis["us"]
  ssh_key_name         = var.ssh_key_name
  release_url          = var.release_url
  release_sha256       = var.release_sha256
  pipe_ca_pem          = var.pipe_ca_pem
  pipe_certs           = var.pipe_certs
  token_public_key_pem = var.token_public_key_pem
  admin_token          = var.admin_token
  turn_secret          = var.turn_secret
  geoip_file           = var.geoip_file
}

locals {
  regions = {
    india  = module.india
    europe = module.europe
    us     = module.us
  }
}

# The one SRV set discovery resolves: every node of every region (a weighted or latency
# record would answer with one region's nodes only).
resource "aws_route53_record" "mesh_srv" {
  zone_id = var.zone_id
  name    = module.india.srv_name
  type    = "SRV"
  ttl     = 30
  records = flatten([for r in local.regions : r.srv_records])
}
