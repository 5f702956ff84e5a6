#!/bin/sh
# Load the demo directory on first start (empty volume), then run slapd in the foreground.
set -eu
conf=/etc/mtp-ldap/slapd.conf
db=/var/lib/mtp-ldap/db
mkdir -p "$db"
if [ -z "$(ls -A "$db")" ]; then
    slapadd -q -f "$conf" -l /etc/mtp-ldap/directory.ldif
fi
exec slapd -d "${SLAPD_DEBUG:-0}" -f "$conf" -h "ldap://0.0.0.0:1389/"
