#!/usr/bin/env bash
# Single-host Ceph radosgw for the S3 test tier: 1 mon + 1 BlueStore OSD (sparse file) + radosgw,
# all bound to 127.0.0.1, all state under one directory. No systemd: daemons fork, write pid files
# under DIR/run and are stopped by those PIDs only. Every subcommand is idempotent.
#
# Usage: ceph-s3.sh init|start|stop|status|env [DIR]        (DIR defaults to $CEPH_S3_DIR)
#   init    install Ceph if missing (needs root + apt), create the cluster and S3 user, start it;
#           on an initialised DIR it only starts what is not running
#   start   start the daemons that are not running (about 5 s)
#   stop    SIGTERM rgw, osd, mon by pid file (SIGKILL after 30 s)
#   status  exit 0 when all three daemons run and rgw answers HTTP
#   env     print `export` lines (endpoint, credentials, region) for eval
# Env at init: RGW_PORT (7480) MON_PORT (3300) S3_ACCESS_KEY S3_SECRET_KEY OSD_SIZE_GB (20).
# These are throwaway test credentials, kept in DIR/s3.env (mode 600) so `env` can print them.
set -euo pipefail

CMD=${1:?usage: $0 init|start|stop|stop-rgw|start-rgw|status|env [DIR]}
D=$(realpath -m "${2:-${CEPH_S3_DIR:?set CEPH_S3_DIR or pass DIR}}")
C=(-c "$D/ceph.conf")
DAEMONS=(mon.a osd.0 client.rgw)   # start order; stop runs it backwards

log() { echo "ceph-s3: $*" >&2; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  for _ in $(seq $((limit * 2))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  log "timeout after ${limit}s waiting for $what (logs: $D/log)"; return 1
}

pid_of() {  # prints the live pid of a daemon, or fails
  local f="$D/run/$1.pid" p
  [ -f "$f" ] || return 1
  p=$(cat "$f")
  # A stale pid file after SIGKILL or a reboot may name an unrelated process: check the binary too.
  grep -qE 'ceph-mon|ceph-osd|radosgw' "/proc/$p/comm" 2>/dev/null || return 1
  # A killed daemon stays a zombie until reaped, and containers' PID 1 may reap late or never.
  [[ $(awk '{print $3}' "/proc/$p/stat" 2>/dev/null) != Z ]] || return 1
  echo "$p"
}

rgw_port() { sed -n 's/^rgw_frontends = beast endpoint=127.0.0.1:\([0-9]*\)$/\1/p' "$D/ceph.conf"; }

rgw_answers() (  # a subshell, so the socket fd never leaks; bash /dev/tcp, so curl is not needed
  exec 3<>"/dev/tcp/127.0.0.1/$(rgw_port)" || exit 1
  printf 'GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
  read -r -t 5 reply <&3 || true
  [[ $reply == HTTP/1.* ]]
)

mon_up() { ceph "${C[@]}" --connect-timeout 2 mon stat; }
osd_up() { ceph "${C[@]}" --connect-timeout 2 osd stat | grep -q '1 up'; }

start_daemon() {
  pid_of "$1" >/dev/null && return 0
  case $1 in
    mon.a) ceph-mon "${C[@]}" -i a; wait_for 60 monitor mon_up ;;
    osd.0) ceph-osd "${C[@]}" -i 0 2>>"$D/log/osd.0.stderr"; wait_for 60 OSD osd_up ;;
    client.rgw) radosgw "${C[@]}" -n client.rgw; wait_for 60 radosgw rgw_answers ;;
  esac
}

start_all() { for n in "${DAEMONS[@]}"; do start_daemon "$n"; done; }

stop_daemon() {
  local p
  p=$(pid_of "$1") || { rm -f "$D/run/$1.pid"; return 0; }
  kill "$p" 2>/dev/null || return 0
  for _ in $(seq 150); do pid_of "$1" >/dev/null || return 0; sleep 0.2; done
  log "$1 (pid $p) ignored SIGTERM for 30 s; sending SIGKILL"
  kill -9 "$p" 2>/dev/null || true
}

stop_all() { for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_daemon "${DAEMONS[i]}"; done; }

install_ceph() {
  command -v radosgw >/dev/null && command -v ceph-mon >/dev/null && command -v ceph-osd >/dev/null && return 0
  log "installing radosgw ceph-mon ceph-osd (Debian 12: Ceph 16.2.15, about 260 MiB)"
  [ "$(id -u)" = 0 ] || { log "installing Ceph needs root"; return 1; }
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    radosgw ceph-mon ceph-osd >/dev/null
}

write_conf() {
  local fsid=$1 rgw_port=$2 mon_port=$3
  cat > "$D/ceph.conf" <<EOF
[global]
fsid = $fsid
mon_host = v2:127.0.0.1:$mon_port
mon_initial_members = a
keyring = $D/keyring
run_dir = $D/run
admin_socket = $D/run/\$name.asok
log_file = $D/log/\$name.log
pid_file = $D/run/\$name.pid
ms_bind_ipv6 = false
# One OSD: pools of size 1, no failure domain above the OSD.
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
osd_crush_chooseleaf_type = 0
# rgw creates ~7 pools; at the default 32 PGs each they pass the per-OSD PG limit.
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_max_pg_per_osd = 1000
# The mon otherwise shuts down when the shared disk is >= 95% full.
mon_data_avail_warn = 2
mon_data_avail_crit = 1
[mon]
mon_data = $D/mon.a
mon_cluster_log_file = $D/log/cluster.log
[osd]
osd_data = $D/osd.0
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = $(( ${OSD_SIZE_GB:-20} * 1024 * 1024 * 1024 ))
osd_memory_target = 1073741824
[client.rgw]
rgw_frontends = beast endpoint=127.0.0.1:$rgw_port
rgw_dns_name = 127.0.0.1
EOF
}

init_cluster() {
  local fsid osd_uuid ak=${S3_ACCESS_KEY:-CKPTACCESSKEY} sk=${S3_SECRET_KEY:-ckpt-secret-key}
  if [ -e "$D" ] && [ -n "$(ls -A "$D")" ]; then
    # A half-finished init of ours (no marker) is redone; anything else is not ours to wipe.
    [ -f "$D/ceph.conf" ] || { log "$D is not empty and not a ceph-s3 directory"; return 1; }
    log "redoing an unfinished init in $D"; stop_all; rm -rf "${D:?}"/*
  fi
  mkdir -p "$D"/{mon.a,osd.0,run,log}
  fsid=$(cat /proc/sys/kernel/random/uuid)
  write_conf "$fsid" "${RGW_PORT:-7480}" "${MON_PORT:-3300}"
  cd "$D"
  ceph-authtool --create-keyring keyring --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool keyring --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool keyring --gen-key -n client.rgw --cap mon 'allow rw' --cap osd 'allow rwx' >/dev/null
  ceph-authtool keyring --gen-key -n osd.0 --cap mon 'allow profile osd' --cap osd 'allow *' --cap mgr 'allow profile osd' >/dev/null
  monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:${MON_PORT:-3300}]" monmap >/dev/null
  ceph-mon "${C[@]}" --mkfs -i a --monmap monmap --keyring keyring
  start_daemon mon.a
  ceph "${C[@]}" auth import -i keyring 2>/dev/null
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  ceph "${C[@]}" osd new "$osd_uuid" 0 >/dev/null
  # mkfs prints harmless "_read_bdev_label failed" / "unparsable uuid" noise for a fresh file.
  ceph-osd "${C[@]}" -i 0 --mkfs --osd-uuid "$osd_uuid" 2>/dev/null
  start_all
  radosgw-admin "${C[@]}" user create --uid=ckpt --display-name=ckpt \
    --access-key="$ak" --secret-key="$sk" >/dev/null
  (umask 077; printf 'AK=%q\nSK=%q\n' "$ak" "$sk" > "$D/s3.env")
  touch "$D/.initialised"
}

case "$CMD" in
  init)
    install_ceph
    if [ -f "$D/.initialised" ]; then start_all; else init_cluster; fi
    log "S3 endpoint http://127.0.0.1:$(rgw_port) (eval \"\$($0 env $D)\" for credentials)" ;;
  start)
    [ -f "$D/.initialised" ] || { log "$D is not initialised; run: $0 init $D"; exit 1; }
    start_all; log "S3 endpoint http://127.0.0.1:$(rgw_port)" ;;
  stop)
    [ -f "$D/ceph.conf" ] || exit 0
    stop_all ;;
  stop-rgw)  # an outage of the S3 endpoint alone (the cluster keeps its data)
    stop_daemon client.rgw ;;
  start-rgw)
    start_daemon client.rgw ;;
  status)
    for n in "${DAEMONS[@]}"; do pid_of "$n" >/dev/null || { log "$n is not running"; exit 1; }; done
    rgw_answers || { log "radosgw does not answer on port $(rgw_port)"; exit 1; }
    log "running: http://127.0.0.1:$(rgw_port)" ;;
  env)
    [ -f "$D/s3.env" ] || { log "$D is not initialised"; exit 1; }
    # shellcheck disable=SC1091
    . "$D/s3.env"
    printf 'export AWS_ENDPOINT_URL_S3=%q\n' "http://127.0.0.1:$(rgw_port)"
    printf 'export AWS_ACCESS_KEY_ID=%q\nexport AWS_SECRET_ACCESS_KEY=%q\n' "$AK" "$SK"
    printf 'export AWS_DEFAULT_REGION=us-east-1\n' ;;
  *) echo "usage: $0 init|start|stop|stop-rgw|start-rgw|status|env [DIR]" >&2; exit 2 ;;
esac
