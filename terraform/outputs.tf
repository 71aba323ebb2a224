output "entry_point" {
  description = "The latency-routed public name: clients ask it for /v1/edge."
  value       = "https://edge.${var.domain}/v1/edge"
}

output "nodes" {
  description = "Meridian region => its nodes' public names."
  value       = { for name, r in local.regions : name => r.public_names }
}
