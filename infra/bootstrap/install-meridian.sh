#!/usr/bin/env bash
# Installs and starts a Meridian node on a fresh Debian 12 instance (run once by cloud-init,
# see terraform/modules/aws-region/cloud-init.yaml.tftpl; safe to run again).
#
#   install-meridian NODE REGION AWS_REGION RELEASE_URL RELEASE_SHA256 PUBLIC_NAME ANNOUNCED_IP
#
# Expects cloud-init to have written /etc/meridian/<REGION>.toml, /etc/meridian/node.toml,
# /etc/meridian/pipe/ca.pem, /etc/meridian/token.pub.pem, the systemd unit, the sysctl
# drop-in, the NGINX site and /etc/turnserver.conf.meridian. Secrets come from SSM Parameter
# Store (the instance role may read this node's only): the pipe key and certificate, the
# admin token and the TURN secret.
set -euo pipefail

if [[ $# -ne 7 ]]; then
    echo "usage: $0 NODE REGION AWS_REGION RELEASE_URL RELEASE_SHA256 PUBLIC_NAME ANNOUNCED_IP" >&2
    exit 2
fi
node=$1 region=$2 aws_region=$3 release_url=$4 release_sha256=$5 public_name=$6 announced_ip=$7

log() { echo "install-meridian: $*" >&2; }

secret() {
    aws ssm get-parameter --region "$aws_region" --with-decryption \
        --name "$1" --query Parameter.Value --output text
}

# The binary, verified against the release's digest before it replaces anything.
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
curl --fail --silent --show-error --location --retry 5 --output "$tmp" "$release_url"
echo "$release_sha256  $tmp" | sha256sum --check --quiet || {
    log "the binary at $release_url does not match its SHA-256; not installing"
    exit 1
}
install -m 0755 "$tmp" /usr/local/bin/meridian

# A user of its own, no login.
if ! id meridian >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/meridian --shell /usr/sbin/nologin meridian
fi
install -d -m 0750 -o meridian -g meridian /var/lib/meridian
install -d -m 0750 -o root -g meridian /etc/meridian /etc/meridian/pipe

umask 027
secret "/meridian/$node/pipe.key" >/etc/meridian/pipe/node.key
secret "/meridian/$node/pipe.pem" >/etc/meridian/pipe/node.pem
secret "/meridian/$region/admin.token" >/etc/meridian/admin.token
chgrp meridian /etc/meridian/pipe/node.key /etc/meridian/pipe/node.pem /etc/meridian/admin.token
chmod 0640 /etc/meridian/pipe/node.key /etc/meridian/admin.token
echo "REGION=$region" >/etc/meridian/env

# The config must load before the service is started: a typo stops here, not in a loop.
meridian_check() {
    /usr/local/bin/meridian check --config "/etc/meridian/$region.toml" --config /etc/meridian/node.toml
}
if ! meridian_check; then
    log "the layered configuration of $node does not load; fix it and run again"
    exit 1
fi

# Socket buffers and limits for media.
sysctl --quiet --system

# TURN for clients behind strict NATs: the shared secret is Meridian's turn.secret_file too.
turn_secret=$(secret "/meridian/$region/turn.secret")
sed -e "s|@TURN_SECRET@|$turn_secret|" \
    -e "s|@REALM@|$public_name|" \
    -e "s|@EXTERNAL_IP@|$announced_ip|" \
    /etc/turnserver.conf.meridian >/etc/turnserver.conf
chmod 0640 /etc/turnserver.conf
chgrp turnserver /etc/turnserver.conf 2>/dev/null || true
printf '%s' "$turn_secret" >/etc/meridian/turn.secret
chgrp meridian /etc/meridian/turn.secret
chmod 0640 /etc/meridian/turn.secret
unset turn_secret
systemctl enable --now coturn

# HTTPS and WebSocket in front of signaling (certificate: see docs/deployment.md).
sed -i "s|@PUBLIC_NAME@|$public_name|g" /etc/nginx/sites-available/meridian.conf
ln -sf /etc/nginx/sites-available/meridian.conf /etc/nginx/sites-enabled/meridian.conf
rm -f /etc/nginx/sites-enabled/default
nginx -t
systemctl reload nginx || systemctl restart nginx

systemctl daemon-reload
systemctl enable meridian
systemctl restart meridian
log "$node ($region) installed; announced $announced_ip; https://$public_name/"
