module "plan" {
  source = "../plan"

  region         = var.region
  nodes          = var.nodes
  domain         = var.domain
  media_port     = var.media_port
  media_ports    = var.media_ports
  ice_tcp        = var.ice_tcp
  signaling_port = var.signaling_port
  metrics_port   = var.metrics_port
  admin_port     = var.admin_port
  pipe_port      = var.pipe_port
  # The other regions' nodes and this region's own (discovery publishes public addresses,
  # so pipes inside a region arrive from Elastic IPs too).
  mesh_cidrs       = concat(var.mesh_cidrs, [for n in local.node_ids : "${aws_eip.node[n].public_ip}/32"])
  operator_cidrs   = var.operator_cidrs
  monitoring_cidrs = var.monitoring_cidrs
  vpc_cidr         = var.vpc_cidr
  announced_ips    = { for n, eip in aws_eip.node : n => eip.public_ip }
  geoip_file       = var.geoip_file
}

locals {
  # Node ids are known before any address: `<region>-<n>`.
  node_ids = [for i in range(var.nodes) : "${var.region}-${i + 1}"]
  tags     = { "meridian:region" = var.region }
  # The proxy's upstreams are this region's ports.
  nginx_conf = replace(
    replace(file("${path.module}/../../../infra/nginx/meridian.conf"), "@SIGNALING_PORT@", tostring(var.signaling_port)),
    "@ADMIN_PORT@", tostring(var.admin_port),
  )
}

data "aws_availability_zones" "up" {
  state = "available"
}

resource "aws_vpc" "this" {
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true
  tags                 = merge(local.tags, { Name = "meridian-${var.region}" })
}

resource "aws_internet_gateway" "this" {
  vpc_id = aws_vpc.this.id
  tags   = local.tags
}

resource "aws_subnet" "public" {
  vpc_id                  = aws_vpc.this.id
  cidr_block              = module.plan.subnet_cidr
  availability_zone       = data.aws_availability_zones.up.names[0]
  map_public_ip_on_launch = false
  tags                    = merge(local.tags, { Name = "meridian-${var.region}-public" })
}

resource "aws_route_table" "public" {
  vpc_id = aws_vpc.this.id
  route {
    cidr_block = "0.0.0.0/0"
    gateway_id = aws_internet_gateway.this.id
  }
  tags = local.tags
}

resource "aws_route_table_association" "public" {
  subnet_id      = aws_subnet.public.id
  route_table_id = aws_route_table.public.id
}

# Exactly the plan's rules: nothing is opened here that the plan (and its tests) do not list.
resource "aws_security_group" "node" {
  name        = "meridian-${var.region}-node"
  description = "Meridian SFU node: media, HTTPS, TURN, pipes from mesh nodes, admin and metrics from their networks"
  vpc_id      = aws_vpc.this.id
  tags        = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "node" {
  for_each = {
    for pair in flatten([
      for name, rule in module.plan.ingress : [
        # Keyed by position: addresses (Elastic IPs) are not known before they exist.
        for i, cidr in rule.cidrs : { key = "${name}:${i}", rule = rule, cidr = cidr }
      ]
    ]) : pair.key => pair
  }
  security_group_id = aws_security_group.node.id
  description       = each.value.rule.name
  ip_protocol       = each.value.rule.protocol
  from_port         = each.value.rule.from
  to_port           = each.value.rule.to
  cidr_ipv4         = each.value.cidr
}

resource "aws_vpc_security_group_egress_rule" "all" {
  security_group_id = aws_security_group.node.id
  description       = "outbound: media to clients, pipes, package and release downloads"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
}

# One address per node, allocated before the instance so it can be written into its config.
resource "aws_eip" "node" {
  for_each = toset(local.node_ids)
  domain   = "vpc"
  tags     = merge(local.tags, { Name = each.key })
}

resource "aws_eip_association" "node" {
  for_each      = toset(local.node_ids)
  instance_id   = aws_instance.node[each.key].id
  allocation_id = aws_eip.node[each.key].id
}

# Secrets go to SSM Parameter Store (encrypted); the instance reads its own with its role.
resource "aws_ssm_parameter" "pipe_key" {
  for_each = toset(local.node_ids)
  name     = "/meridian/${each.key}/pipe.key"
  type     = "SecureString"
  value    = var.pipe_certs[each.key].key
}

resource "aws_ssm_parameter" "pipe_cert" {
  for_each = toset(local.node_ids)
  name     = "/meridian/${each.key}/pipe.pem"
  type     = "SecureString"
  value    = var.pipe_certs[each.key].cert
}

resource "aws_ssm_parameter" "admin_token" {
  name  = "/meridian/${var.region}/admin.token"
  type  = "SecureString"
  value = var.admin_token
}

resource "aws_ssm_parameter" "turn_secret" {
  name  = "/meridian/${var.region}/turn.secret"
  type  = "SecureString"
  value = var.turn_secret
}

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "node" {
  for_each           = toset(local.node_ids)
  name               = "meridian-${each.key}"
  assume_role_policy = data.aws_iam_policy_document.assume.json
  tags               = local.tags
}

# Each node reads its own key and the region's shared secrets, nothing else.
data "aws_iam_policy_document" "read_own" {
  for_each = toset(local.node_ids)
  statement {
    actions = ["ssm:GetParameter"]
    resources = [
      aws_ssm_parameter.pipe_key[each.key].arn,
      aws_ssm_parameter.pipe_cert[each.key].arn,
      aws_ssm_parameter.admin_token.arn,
      aws_ssm_parameter.turn_secret.arn,
    ]
  }
}

resource "aws_iam_role_policy" "read_own" {
  for_each = toset(local.node_ids)
  name     = "read-own-secrets"
  role     = aws_iam_role.node[each.key].id
  policy   = data.aws_iam_policy_document.read_own[each.key].json
}

resource "aws_iam_instance_profile" "node" {
  for_each = toset(local.node_ids)
  name     = "meridian-${each.key}"
  role     = aws_iam_role.node[each.key].name
}

resource "aws_instance" "node" {
  for_each               = toset(local.node_ids)
  ami                    = var.ami_id
  instance_type          = var.instance_type
  subnet_id              = aws_subnet.public.id
  vpc_security_group_ids = [aws_security_group.node.id]
  key_name               = var.ssh_key_name
  iam_instance_profile   = aws_iam_instance_profile.node[each.key].name
  # Media relays need the ENA's full bandwidth; no source/dest check is needed (no NAT here).
  ebs_optimized = true
  metadata_options {
    http_tokens = "required"
  }
  root_block_device {
    volume_size = 100
    volume_type = "gp3"
    encrypted   = true
  }
  user_data = templatefile("${path.module}/cloud-init.yaml.tftpl", {
    node           = each.key
    region         = var.region
    aws_region     = var.aws_region
    region_file    = file(var.region_file)
    node_config    = module.plan.node_config[each.key]
    bootstrap      = file("${path.module}/../../../infra/bootstrap/install-meridian.sh")
    unit           = file("${path.module}/../../../infra/systemd/meridian.service")
    sysctl         = file("${path.module}/../../../infra/systemd/90-meridian-udp.conf")
    nginx_conf     = local.nginx_conf
    turn_conf      = file("${path.module}/../../../infra/coturn/turnserver.conf")
    release_url    = var.release_url
    release_sha256 = var.release_sha256
    ca_pem         = var.pipe_ca_pem
    token_pub_pem  = var.token_public_key_pem
    public_name    = "${each.key}.${var.domain}"
    announced_ip   = aws_eip.node[each.key].public_ip
  })
  user_data_replace_on_change = true
  tags                        = merge(local.tags, { Name = each.key })
}

# DNS: the node's public name (TLS, signaling URL), its mesh name with the TXT record, the
# SRV set discovery resolves, and the region's answer for the latency-routed entry point.
resource "aws_route53_record" "public" {
  for_each = toset(local.node_ids)
  zone_id  = var.zone_id
  name     = "${each.key}.${var.domain}"
  type     = "A"
  ttl      = 60
  records  = [aws_eip.node[each.key].public_ip]
}

resource "aws_route53_record" "mesh_host" {
  for_each = module.plan.hostnames
  zone_id  = var.zone_id
  name     = each.value
  type     = "A"
  ttl      = 30
  records  = [aws_eip.node[each.key].public_ip]
}

resource "aws_route53_record" "mesh_txt" {
  for_each = module.plan.txt_records
  zone_id  = var.zone_id
  name     = module.plan.hostnames[each.key]
  type     = "TXT"
  ttl      = 30
  # One attribute per string (RFC 1464); Route 53 takes the strings quoted and space-separated.
  records = [join("\" \"", each.value)]
}

resource "aws_route53_record" "entry" {
  zone_id        = var.zone_id
  name           = module.plan.entry_name
  type           = "A"
  ttl            = 30
  set_identifier = var.region
  records        = [for n in local.node_ids : aws_eip.node[n].public_ip]
  latency_routing_policy {
    region = var.aws_region
  }
}
