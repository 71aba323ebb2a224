output "node_ids" {
  value = local.node_ids
}

output "eip_cidrs" {
  description = "The nodes' Elastic IPs as /32: the other regions open their pipe port to these."
  value       = [for n in local.node_ids : "${aws_eip.node[n].public_ip}/32"]
}

output "srv_name" {
  value = module.plan.srv_name
}

output "srv_records" {
  description = "The region's SRV data; the root puts every region's into the one set discovery resolves."
  value       = values(module.plan.srv_records)
}

output "public_names" {
  value = [for n in local.node_ids : "${n}.${var.domain}"]
}
