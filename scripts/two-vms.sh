#!/usr/bin/env bash
# Two real QEMU virtual machines sharing memory (issue 11, "Real virtual machines").
#
# Boots two small guests (QEMU's TCG, a Debian kernel, a busybox initramfs whose /init is
# scripts/vm-guest/init: a workload that checks its own data) and merges their memory with
#   --engine kernel    the host kernel's KSM (QEMU advises its guest RAM MADV_MERGEABLE)
#   --engine samepage  samepage's daemon, each QEMU under `samepage run`
#   --engine both      one after the other, the same guests, one table
# and reports pages_shared, pages_sharing, ksm_zero_pages, the PSS of the processes before and
# after, the time to settle, the merging engine's CPU, and the guests' own checks while merged.
#
# It installs what it needs (qemu-system-x86 with apt; the Debian kernel and busybox-static
# are downloaded with `apt-get download` and unpacked into the work directory, not installed).
# Needs root. Run `scripts/two-vms.sh --help` for the options.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GUEST_INIT=$ROOT/scripts/vm-guest/init
KSM=/sys/kernel/mm/ksm
LOCK_DIR=/run/samepage
LOCK_FILE=$LOCK_DIR/host-ksm.lock
SAVED_FILE=$LOCK_DIR/host-ksm.saved
# The host knobs the kernel phase changes (saved first, restored on every exit path).
KNOBS=(run pages_to_scan sleep_millisecs use_zero_pages)

ENGINE=kernel
WORK=${TMPDIR:-/tmp}/samepage-vms
SAMEPAGE=$ROOT/target/release/samepage
KERNEL=""
MEM=256
COMMON=48
UNIQUE=16
FREE=48
SCRATCH=256
ROUND_SLEEP=2
INIT_ON_FREE=1
EXTRA_APPEND=""
PAGES_TO_SCAN=100000
USE_ZERO_PAGES=1
SETTLE_SECS=10
SETTLE_SCANS=2
TOL_MIN=512
TOL_PERMILLE=10
OBSERVE=30
BOOT_TIMEOUT=600
SETTLE_TIMEOUT=900
JSON=""
RESTORE=0

usage() {
  cat <<EOF
usage: scripts/two-vms.sh [options]

  --engine kernel|samepage|both  what merges the two guests (default kernel)
  --work-dir DIR          work files: kernel, initramfs, logs (default \${TMPDIR:-/tmp}/samepage-vms)
  --samepage PATH         the samepage binary (default target/release/samepage)
  --kernel FILE           boot this bzImage instead of Debian's linux-image-amd64
  --memory MIB            guest RAM of each QEMU (default $MEM)
  --common MIB            data identical in both guests (default $COMMON)
  --unique MIB            data of each guest alone (default $UNIQUE)
  --free MIB              written, then deleted in each guest: freed memory (default $FREE)
  --scratch KIB           rewritten with new content every round (default $SCRATCH)
  --round-sleep SECS      pause between the guests' rounds (default $ROUND_SLEEP)
  --init-on-free 0|1      the guests' init_on_free (default $INIT_ON_FREE: freed pages are zeroed)
  --append STRING         more guest kernel command line
  --pages-to-scan N       pages_to_scan of the merging engine (default $PAGES_TO_SCAN; sleep_millisecs=0)
  --use-zero-pages 0|1    use_zero_pages of the merging engine (default $USE_ZERO_PAGES)
  --settle-seconds S      settled: counters within the tolerance for S seconds (default $SETTLE_SECS)
  --settle-scans N        ... and N full scans (default $SETTLE_SCANS)
  --tolerance-pages N     ... tolerance: max(N, the permille below of saved pages) (default $TOL_MIN)
  --tolerance-permille N  (default $TOL_PERMILLE)
  --observe SECS          keep the guests running merged this long after settling (default $OBSERVE)
  --settle-timeout SECS   give up settling after SECS (default $SETTLE_TIMEOUT)
  --json FILE             also write the results as JSON
  --restore               only put back the host KSM knobs a killed run left in $SAVED_FILE
EOF
}

say() { printf 'two-vms: %s\n' "$*"; }
die() {
  printf 'two-vms: %s\n' "$*" >&2
  exit 1
}

while [ $# -gt 0 ]; do
  case $1 in
    --engine) ENGINE=$2; shift ;;
    --work-dir) WORK=$2; shift ;;
    --samepage) SAMEPAGE=$2; shift ;;
    --kernel) KERNEL=$2; shift ;;
    --memory) MEM=$2; shift ;;
    --common) COMMON=$2; shift ;;
    --unique) UNIQUE=$2; shift ;;
    --free) FREE=$2; shift ;;
    --scratch) SCRATCH=$2; shift ;;
    --round-sleep) ROUND_SLEEP=$2; shift ;;
    --init-on-free) INIT_ON_FREE=$2; shift ;;
    --append) EXTRA_APPEND=$2; shift ;;
    --pages-to-scan) PAGES_TO_SCAN=$2; shift ;;
    --use-zero-pages) USE_ZERO_PAGES=$2; shift ;;
    --settle-seconds) SETTLE_SECS=$2; shift ;;
    --settle-scans) SETTLE_SCANS=$2; shift ;;
    --tolerance-pages) TOL_MIN=$2; shift ;;
    --tolerance-permille) TOL_PERMILLE=$2; shift ;;
    --observe) OBSERVE=$2; shift ;;
    --settle-timeout) SETTLE_TIMEOUT=$2; shift ;;
    --json) JSON=$2; shift ;;
    --restore) RESTORE=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
  shift
done
case $ENGINE in kernel | samepage | both) ;; *) usage >&2; exit 2 ;; esac
for v in MEM COMMON UNIQUE FREE SCRATCH ROUND_SLEEP INIT_ON_FREE PAGES_TO_SCAN USE_ZERO_PAGES SETTLE_SECS \
  SETTLE_SCANS TOL_MIN TOL_PERMILLE OBSERVE SETTLE_TIMEOUT; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "--$(tr '_A-Z' '-a-z' <<<"$v") wants a whole number, not '${!v}'."
done
[ "$INIT_ON_FREE" -le 1 ] || die "--init-on-free is 0 or 1."
[ "$USE_ZERO_PAGES" -le 1 ] || die "--use-zero-pages is 0 or 1."
[ $((COMMON + UNIQUE + FREE)) -lt "$MEM" ] || die "--common + --unique + --free must fit in --memory."

# ---------------------------------------------------------------------------------------------
# Time, processes

now_ms() {
  local t=${EPOCHREALTIME/./}
  echo $((t / 1000))
}
secs() { awk -v ms="$1" 'BEGIN { printf "%.1f", ms / 1000 }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

GUEST_PIDS=()  # what the script started for each guest (QEMU, or samepage run)
QEMU_PIDS=()   # the QEMU processes
DAEMON_PID=""
KSM_TAKEN=0

# stop PID: SIGTERM, then SIGKILL after 5 s; only processes this script started.
stop_pid() {
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

stop_guests() {
  local p
  for p in "${QEMU_PIDS[@]}" "${GUEST_PIDS[@]}"; do stop_pid "$p"; done
  QEMU_PIDS=()
  GUEST_PIDS=()
}

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  case $rc in 130 | 143) printf 'two-vms: interrupted: stopping the guests, restoring the host KSM\n' >&2 ;; esac
  stop_guests
  if [ -n "$DAEMON_PID" ]; then stop_pid "$DAEMON_PID"; DAEMON_PID=""; fi
  [ "$KSM_TAKEN" = 1 ] && restore_ksm
  release_lock
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The task's threads' CPU time in ns (first field of /proc/PID/task/*/schedstat).
cpu_ns() {
  cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%.0f", s }'
}
pss_kib() {
  local sum=0 p v
  for p in "$@"; do
    v=$(awk '/^Pss:/ { print $2 }' /proc/"$p"/smaps_rollup 2>/dev/null || true)
    sum=$((sum + ${v:-0}))
  done
  echo "$sum"
}
find_ksmd() {
  local d
  for d in /proc/[0-9]*; do
    if [ "$(cat "$d"/comm 2>/dev/null)" = ksmd ]; then
      echo "${d#/proc/}"
      return
    fi
  done
}

# ---------------------------------------------------------------------------------------------
# Host KSM: refuse, take, restore

# The saved file is samepage's format (crates/linux/src/host.rs): '#' comment lines, pid=,
# command=, then KNOB=VALUE lines (values as written, advisor_mode=none), vm.max_map_count=.
check_saved_file() {
  if [ -e "$SAVED_FILE" ]; then
    die "$SAVED_FILE exists: a command that changed the host's KSM knobs ($(grep -E '^(pid|command)=' "$SAVED_FILE" | tr '\n' ' ')) was killed before it restored them. Run any samepage host command (or scripts/two-vms.sh --restore) to restore them, or write the values in that file back to $KSM by hand and remove it; refusing to start."
  fi
}

# The lock: flock on $LOCK_FILE through fd 9 (opened without truncating: the holder's pid is
# in it), our pid written in while we hold it, emptied when we let go.
take_lock() {
  mkdir -p "$LOCK_DIR"
  exec 9<>"$LOCK_FILE"
  if ! flock -n 9; then
    say "waiting up to $LOCK_WAIT s for $LOCK_FILE (held by pid $(head -c 20 "$LOCK_FILE" | tr -dc 0-9): another samepage tool is using the host's KSM)"
    flock -w "$LOCK_WAIT" 9 || die "$LOCK_FILE was still held after $LOCK_WAIT s; try again later."
  fi
  LOCKED=1
  echo "$$" >"$LOCK_FILE"
}
release_lock() {
  [ "$LOCKED" = 1 ] || return 0
  : >"$LOCK_FILE"
  exec 9>&-
  LOCKED=0
}
LOCKED=0
LOCK_WAIT=600

take_ksm() {
  [ -d "$KSM" ] || die "this kernel has no KSM ($KSM is missing)."
  take_lock
  check_saved_file
  local run k
  run=$(cat "$KSM/run")
  [ "$run" = 0 ] || die "the host's KSM is running (run=$run): something else uses it; stop it (echo 2 > $KSM/run) or wait until it is done."
  for k in pages_shared pages_sharing ksm_zero_pages; do
    [ "$(cat "$KSM/$k")" = 0 ] || die "the host's KSM still holds merged pages ($k=$(cat "$KSM/$k")); run 'echo 2 > $KSM/run' first."
  done
  for k in "${KNOBS[@]}"; do SAVED[$k]=$(shown "$(cat "$KSM/$k")"); done
  {
    echo "# scripts/two-vms.sh: the host's KSM knobs it changes, as they were before (format: crates/linux/src/host.rs)."
    echo "# If pid is gone, put them back: scripts/two-vms.sh --restore, or any samepage host command."
    echo "pid=$$"
    echo "command=scripts/two-vms.sh"
    for k in "${KNOBS[@]}"; do echo "$k=${SAVED[$k]}"; done
  } >"$SAVED_FILE.tmp"
  sync "$SAVED_FILE.tmp" 2>/dev/null || true
  mv "$SAVED_FILE.tmp" "$SAVED_FILE"
  KSM_TAKEN=1
  say "host KSM knobs saved to $SAVED_FILE: $(saved_list)"
}
declare -A SAVED=()
saved_list() {
  local k
  for k in $(printf '%s\n' "${!SAVED[@]}" | sort); do printf '%s=%s ' "$k" "${SAVED[$k]}"; done
}
# What a knob's file shows, as one writes it: "[none] scan-time" is "none".
shown() {
  if [[ $1 =~ \[([^]]*)\] ]]; then echo "${BASH_REMATCH[1]}"; else echo "$1"; fi
}
knob_file() {
  if [ "$1" = vm.max_map_count ]; then echo /proc/sys/vm/max_map_count; else echo "$KSM/$1"; fi
}

# --restore: put back what a killed run (of this script, or of a samepage command: the same
# file) saved in $SAVED_FILE.
restore_saved_file() {
  local k v
  [ "$(id -u)" = 0 ] || die "run it as root."
  take_lock
  [ -e "$SAVED_FILE" ] || die "$SAVED_FILE does not exist: nothing to restore."
  while IFS='=' read -r k v; do
    case $k in '#'* | pid | command | "") continue ;; esac
    if ! [[ $k =~ ^[a-z_.]+$ ]] || [ ! -f "$(knob_file "$k")" ] || [ "$k" = full_scans ]; then
      die "$SAVED_FILE names no knob of $KSM: '$k'."
    fi
    SAVED[$k]=$v
  done <"$SAVED_FILE"
  [ -n "${SAVED[run]:-}" ] || die "$SAVED_FILE has no run= line."
  KSM_TAKEN=1
  restore_ksm
}

# Unmerge everything (run=2), put every knob back (the advisor's knobs first, advisor_mode,
# then pages_to_scan, which a change of advisor_mode resets and the scan-time advisor owns),
# then run as it was; the saved file goes only when all of them read back as saved.
restore_ksm() {
  local k bad="" order=()
  echo 2 >"$KSM/run" || true
  for k in "${!SAVED[@]}"; do
    if [[ $k == advisor_* && $k != advisor_mode ]]; then order+=("$k"); fi
  done
  [ -z "${SAVED[advisor_mode]:-}" ] || order+=(advisor_mode)
  for k in "${!SAVED[@]}"; do
    case $k in advisor_* | run | pages_to_scan) ;; *) order+=("$k") ;; esac
  done
  [ -z "${SAVED[pages_to_scan]:-}" ] || [ "${SAVED[advisor_mode]:-none}" = scan-time ] || order+=(pages_to_scan)
  for k in "${order[@]}"; do
    [ "$(shown "$(cat "$(knob_file "$k")")")" = "${SAVED[$k]}" ] ||
      echo "${SAVED[$k]}" >"$(knob_file "$k")" 2>/dev/null || true
  done
  echo "${SAVED[run]}" >"$KSM/run" || true
  for k in "${order[@]}" run; do
    [ "$(shown "$(cat "$(knob_file "$k")")")" = "${SAVED[$k]}" ] ||
      bad="$bad $k=$(cat "$(knob_file "$k")") (was ${SAVED[$k]})"
  done
  KSM_TAKEN=0
  if [ -n "$bad" ]; then
    printf 'two-vms: could not restore the host KSM knobs:%s; %s kept\n' "$bad" "$SAVED_FILE" >&2
    return 1
  fi
  rm -f "$SAVED_FILE"
  say "host KSM restored: run=2 unmerged everything, then $(saved_list)"
}

# ---------------------------------------------------------------------------------------------
# What the guests need

APT_UPDATED=0
apt_update() {
  [ "$APT_UPDATED" = 1 ] && return
  say "apt-get update"
  apt-get update -qq >"$WORK/apt.log" 2>&1 || die "apt-get update failed (see $WORK/apt.log)."
  APT_UPDATED=1
}
apt_install() {
  apt_update
  say "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
    >>"$WORK/apt.log" 2>&1 || die "apt-get install $* failed (see $WORK/apt.log)."
}
# unpack PKG DIR: apt-get download PKG and unpack it into DIR (nothing is installed).
unpack() {
  local pkg=$1 dir=$2 deb
  apt_update
  rm -rf "$WORK/deb" "$dir"
  mkdir -p "$WORK/deb" "$dir"
  (cd "$WORK/deb" && apt-get download -q "$pkg" >>"$WORK/apt.log" 2>&1) ||
    die "apt-get download $pkg failed (see $WORK/apt.log)."
  deb=$(ls "$WORK"/deb/*.deb)
  dpkg-deb -x "$deb" "$dir"
  rm -rf "$WORK/deb"
}

prepare() {
  [ "$(id -u)" = 0 ] || die "run it as root (it installs packages and drives the host's KSM)."
  mkdir -p "$WORK"
  WORK=$(cd "$WORK" && pwd)
  case $WORK/ in "$ROOT"/*) die "the work directory must be outside the repository ($WORK)." ;; esac
  command -v qemu-system-x86_64 >/dev/null || apt_install qemu-system-x86
  if ! command -v flock >/dev/null || ! command -v setpriv >/dev/null; then apt_install util-linux; fi
  if [ "$ENGINE" != kernel ] && ! command -v jq >/dev/null; then apt_install jq; fi
  QEMU_VERSION=$(qemu-system-x86_64 --version | head -n 1)

  BUSYBOX=$WORK/busybox/bin/busybox
  if [ ! -x "$BUSYBOX" ]; then unpack busybox-static "$WORK/busybox"; fi
  [ -x "$BUSYBOX" ] || die "busybox-static did not contain bin/busybox."

  if [ -z "$KERNEL" ]; then
    local found=("$WORK"/kernel/boot/vmlinuz-*)
    [ ! -e "${found[0]}" ] || KERNEL=${found[0]}
    if [ -z "$KERNEL" ]; then
      apt_update
      local pkg
      pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
      [ -n "$pkg" ] || die "apt-cache found no kernel behind linux-image-amd64."
      say "guest kernel: apt-get download $pkg"
      unpack "$pkg" "$WORK/kernel"
      found=("$WORK"/kernel/boot/vmlinuz-*)
      KERNEL=${found[0]}
    fi
  fi
  [ -r "$KERNEL" ] || die "no guest kernel at $KERNEL."

  # The initramfs: a static busybox and /init, nothing else.
  rm -rf "$WORK/rootfs"
  mkdir -p "$WORK/rootfs/bin"
  cp "$BUSYBOX" "$WORK/rootfs/bin/busybox"
  cp "$GUEST_INIT" "$WORK/rootfs/init"
  chmod 755 "$WORK/rootfs/init"
  INITRD=$WORK/initramfs.cpio.gz
  (cd "$WORK/rootfs" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null) | gzip -1 >"$INITRD"
  say "guest: $(basename "$KERNEL"), initramfs $(du -k "$INITRD" | cut -f1) KiB (busybox $("$BUSYBOX" | head -n 1 | cut -d' ' -f2)), $QEMU_VERSION"
}

# ---------------------------------------------------------------------------------------------
# Guests

SOCK=""
declare -A BOOT_MS=() START_MS=() READY_MS=()

# start_guest N ENGINE: boot guest N (seed N) under ENGINE; its serial console goes to guestN.log.
start_guest() {
  local n=$1 engine=$2 log=$WORK/guest$1.log append
  : >"$log"
  append="console=ttyS0 panic=-1 quiet init_on_free=$INIT_ON_FREE samepage.seed=$n"
  append="$append samepage.common=$COMMON samepage.unique=$UNIQUE samepage.free=$FREE"
  append="$append samepage.scratch=$SCRATCH samepage.sleep=$ROUND_SLEEP $EXTRA_APPEND"
  local qemu=(qemu-system-x86_64 -name "samepage-guest$n" -accel tcg -m "$MEM" -smp 1
    -nodefaults -display none -monitor none -no-reboot -serial "file:$log"
    -kernel "$KERNEL" -initrd "$INITRD" -append "$append")
  if [ "$engine" = samepage ]; then
    qemu=("$SAMEPAGE" run --socket "$SOCK" -- "${qemu[@]}")
  fi
  # The parent-death signal kills the guest even if this script is SIGKILLed; fd 9 (the lock)
  # stays with the script.
  START_MS[$n]=$(now_ms)
  setpriv --pdeathsig KILL "${qemu[@]}" </dev/null >"$WORK/qemu$n.out" 2>&1 9>&- &
  GUEST_PIDS+=("$!")
}

# The QEMU process of what start_guest started: that process itself, or one of its descendants.
qemu_pid_of() {
  local todo=("$1") p f kids
  while [ ${#todo[@]} -gt 0 ]; do
    p=${todo[0]}
    todo=("${todo[@]:1}")
    case $(readlink "/proc/$p/exe" 2>/dev/null) in */qemu-system-x86_64) echo "$p"; return ;; esac
    for f in /proc/"$p"/task/*/children; do
      kids=()
      read -ra kids <"$f" 2>/dev/null || true
      todo+=("${kids[@]}")
    done
  done
}

# wait_lines PATTERN TIMEOUT N...: until each guest N's log has a line matching PATTERN;
# SEEN_MS[N] is when this script first saw it.
declare -A SEEN_MS=()
wait_lines() {
  local pat=$1 timeout=$2 t0 n left log
  shift 2
  t0=$(now_ms)
  for n in "$@"; do SEEN_MS[$n]=""; done
  while :; do
    left=0
    for n in "$@"; do
      [ -z "${SEEN_MS[$n]}" ] || continue
      log=$WORK/guest$n.log
      if grep -q -- "$pat" "$log"; then
        SEEN_MS[$n]=$(now_ms)
        continue
      fi
      left=1
      kill -0 "${GUEST_PIDS[$((n - 1))]}" 2>/dev/null ||
        die "guest $n stopped before printing '$pat' (console: $log, QEMU: $WORK/qemu$n.out): $(tail -n 3 "$log" "$WORK/qemu$n.out" | tr '\n' ' ')"
    done
    [ "$left" = 1 ] || return 0
    check_guests
    [ $(($(now_ms) - t0)) -lt $((timeout * 1000)) ] || die "a guest printed no '$pat' in $timeout s (consoles: $WORK/guest*.log)."
    sleep 0.2
  done
}

rounds_ok() { grep -c 'samepage-guest .* round [0-9]* ok' "$WORK/guest$1.log" || true; }
check_guests() {
  local n
  for n in 1 2; do
    if grep -q MISMATCH "$WORK/guest$n.log"; then
      die "guest $n found its data changed: $(grep MISMATCH "$WORK/guest$n.log" | head -n 3)"
    fi
  done
}

# boot_guests ENGINE: boot both, wait until each has written its data and checked it once.
boot_guests() {
  local engine=$1 n pid
  for n in 1 2; do start_guest "$n" "$engine"; done
  wait_lines 'samepage-guest .* booted' "$BOOT_TIMEOUT" 1 2
  for n in 1 2; do BOOT_MS[$n]=$((SEEN_MS[$n] - START_MS[$n])); done
  for n in 1 2; do
    pid=""
    for _ in $(seq 50); do
      pid=$(qemu_pid_of "${GUEST_PIDS[$((n - 1))]}")
      [ -n "$pid" ] && break
      sleep 0.1
    done
    [ -n "$pid" ] || die "found no qemu-system-x86_64 process under pid ${GUEST_PIDS[$((n - 1))]}."
    QEMU_PIDS+=("$pid")
    say "guest $n: QEMU pid $pid, booted to /init in $(secs "${BOOT_MS[$n]}") s (host time from starting QEMU)"
    report_guest_ram "$n" "$pid" "$engine"
  done
  wait_lines 'samepage-guest .* round 1 ok' "$BOOT_TIMEOUT" 1 2
  for n in 1 2; do READY_MS[$n]=$((SEEN_MS[$n] - START_MS[$n])); done
  local d1 d2
  d1=$(sed -n 's/.*common .* MiB digest \([0-9a-f]*\).*/\1/p' "$WORK/guest1.log")
  d2=$(sed -n 's/.*common .* MiB digest \([0-9a-f]*\).*/\1/p' "$WORK/guest2.log")
  if [ -z "$d1" ] || [ "$d1" != "$d2" ]; then die "the guests' common data differ ($d1, $d2)."; fi
  for n in 1 2; do say "guest $n: $(grep -o 'data written.*' "$WORK/guest$n.log")"; done
  say "both guests checked their data once (round 1 ok); the common data have the same digest in both ($d1)"
}

# The guest-RAM mapping of QEMU: the mapping advised MADV_MERGEABLE ('mg'), or, where QEMU's
# madvise went to samepage instead, the mapping exactly as large as the guest's memory.
report_guest_ram() {
  local n=$1 pid=$2 engine=$3 map
  map=$(awk -v want=$((MEM * 1024)) '
    /^[0-9a-f]+-[0-9a-f]+ / { range = $1 }
    /^Size:/ { size = $2 }
    /^VmFlags:/ && size >= want {
      sub(/^VmFlags: */, ""); mg = (" " $0 " " ~ / mg /)
      if (mg && !found_mg) { found_mg = range " " size " [" $0 "]" }
      if (size == want && !found_size) { found_size = range " " size " [" $0 "]" }
    }
    END { if (found_mg) print "yes " found_mg; else if (found_size) print "no " found_size }' "/proc/$pid/smaps")
  [ -n "$map" ] || die "found no guest-RAM mapping of $MEM MiB in /proc/$pid/smaps."
  read -r mg range size flags <<<"$map"
  GUEST_RAM[$n]=$range
  GUEST_RAM_MG[$n]=$mg
  say "guest $n: guest RAM $range, $size KiB, VmFlags $flags"
  if [ "$engine" = kernel ]; then
    [ "$mg" = yes ] || die "QEMU did not advise its guest RAM MADV_MERGEABLE (no 'mg' in VmFlags): the kernel's KSM would not see it."
    say "guest $n: QEMU advised its guest RAM MADV_MERGEABLE itself (mem-merge is on by default): 'mg' is in its VmFlags"
  else
    say "guest $n: 'mg' in VmFlags: $mg (samepage run takes QEMU's madvise to the daemon instead of the kernel)"
  fi
}

# ram_kib PID RANGE FIELD: FIELD (Rss, Pss) summed over the mappings inside RANGE (samepage
# may split the guest RAM into many mappings).
ram_kib() {
  awk -v lo="${2%-*}" -v hi="${2#*-}" -v f="$3:" '
    BEGIN { inside = 0 }
    # Addresses of one range have the same number of hex digits: compare them as strings.
    /^[0-9a-f]+-[0-9a-f]+ / { split($1, a, "-"); inside = length(a[1]) == length(lo) && a[1] >= lo && a[2] <= hi }
    inside && $1 == f { s += $2 }
    END { printf "%d", s }' "/proc/$1/smaps"
}
declare -A GUEST_RAM_MG=() GUEST_RAM=()

# ---------------------------------------------------------------------------------------------
# Counters of either engine: C[pages_shared] ... and the CPU of the merging engine.

declare -A C=()
KSM_FIELDS=(pages_shared pages_sharing ksm_zero_pages full_scans pages_unshared pages_volatile general_profit)

read_counters() {
  local engine=$1 k
  if [ "$engine" = kernel ]; then
    for k in "${KSM_FIELDS[@]}"; do C[$k]=$(cat "$KSM/$k"); done
  else
    local json vals i=0
    json=$("$SAMEPAGE" stat --daemon --socket "$SOCK" --json) ||
      die "samepage stat --daemon --socket $SOCK --json failed."
    printf '%s\n' "$json" >"$WORK/samepage-stat.json"
    vals=$(jq -r '.ksm | (.pages_shared, .pages_sharing, .ksm_zero_pages, .full_scans,
      .pages_unshared, .pages_volatile, .general_profit) // 0' <<<"$json") ||
      die "samepage stat --json printed no ksm object: $json"
    while read -r k; do
      C[${KSM_FIELDS[$i]}]=$k
      i=$((i + 1))
    done <<<"$vals"
  fi
}

# The per-process figures (/proc/PID/ksm_stat, or samepage's ksm_stat entry with that pid).
proc_stat() {
  local engine=$1 pid=$2
  if [ "$engine" = kernel ]; then
    tr '\n' ' ' <"/proc/$pid/ksm_stat"
  else
    jq -r --argjson pid "$pid" '.ksm_stat[] | select(.pid == $pid) | to_entries
      | map(select(.key != "pid") | "\(.key) \(.value)") | join(" ")' "$WORK/samepage-stat.json"
  fi
}

engine_cpu_ns() {
  if [ "$1" = kernel ]; then cpu_ns "$KSMD_PID"; else cpu_ns "$DAEMON_PID"; fi
}
# samepage's own processes (the daemon, and each `samepage run` that is not QEMU itself).
own_pids() {
  local p
  [ "$1" = samepage ] || return 0
  echo "$DAEMON_PID"
  for p in "${GUEST_PIDS[@]}"; do
    case " ${QEMU_PIDS[*]} " in *" $p "*) ;; *) echo "$p" ;; esac
  done
}
# Every process whose PSS counts.
engine_pids() {
  printf '%s\n' "${QEMU_PIDS[@]}"
  own_pids "$1"
}

set_knob() { # engine knob value
  if [ "$1" = kernel ]; then
    echo "$3" >"$KSM/$2"
  else
    "$SAMEPAGE" ctl --socket "$SOCK" "$2=$3" >>"$WORK/daemon-ctl.log" 2>&1 ||
      die "samepage ctl --socket $SOCK $2=$3 failed: $(tail -n 2 "$WORK/daemon-ctl.log")"
  fi
}

# zero_pages PID RANGE: "PRESENT ZERO", the pages of RANGE that /proc/PID/pagemap shows
# present, and those of them that map the kernel's shared zero page (found as the page a read of
# fresh anonymous memory maps). Both engines' zero pages are that page; but the host kernel also
# maps it where it splits a transparent huge page (QEMU advises its guest RAM MADV_HUGEPAGE) into
# zero-filled small pages, and those are not counted in ksm_zero_pages.
zero_pages() {
  command -v python3 >/dev/null || { echo "- -"; return; }
  python3 - "$1" "$2" <<'PY'
import ctypes, mmap, struct, sys
PAGE, PFN = 4096, (1 << 55) - 1
m = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
assert m[0] == 0
buf = ctypes.c_char.from_buffer(m)
with open("/proc/self/pagemap", "rb") as f:
    f.seek(ctypes.addressof(buf) // PAGE * 8)
    (e,) = struct.unpack("<Q", f.read(8))
del buf
zero_pfn = e & PFN
assert e >> 63 and zero_pfn, "no PFN in /proc/self/pagemap"
lo, hi = (int(x, 16) for x in sys.argv[2].split("-"))
present = zero = 0
with open("/proc/%s/pagemap" % sys.argv[1], "rb") as f:
    f.seek(lo // PAGE * 8)
    for (v,) in struct.iter_unpack("<Q", f.read((hi - lo) // PAGE * 8)):
        if v >> 63:
            present += 1
            zero += (v & PFN) == zero_pfn
print(present, zero)
PY
}

# guest_ram_kib ENGINE WHEN: the Rss and Pss of both guests' RAM mappings, summed, and their
# pages on the shared zero page.
guest_ram_kib() {
  local n rss=0 pss=0 zero=0 present pz
  for n in 1 2; do
    rss=$((rss + $(ram_kib "${QEMU_PIDS[$((n - 1))]}" "${GUEST_RAM[$n]}" Rss)))
    pss=$((pss + $(ram_kib "${QEMU_PIDS[$((n - 1))]}" "${GUEST_RAM[$n]}" Pss)))
    read -r present pz <<<"$(zero_pages "${QEMU_PIDS[$((n - 1))]}" "${GUEST_RAM[$n]}")"
    if [ "$pz" = - ]; then zero=-; elif [ "$zero" != - ]; then zero=$((zero + pz)); fi
    : "$present"
  done
  R[$1.ram_rss_$2_kib]=$rss
  R[$1.ram_pss_$2_kib]=$pss
  R[$1.ram_zero_pages_$2]=$zero
  R[$1.thp_split_page_$2]=$(awk '$1 == "thp_split_page" { print $2 }' /proc/vmstat)
  R[$1.thp_collapse_alloc_$2]=$(awk '$1 == "thp_collapse_alloc" { print $2 }' /proc/vmstat)
}

# ---------------------------------------------------------------------------------------------
# One engine's run

declare -A R=()  # results, "engine.key"

# measure ENGINE: guests booted and checked; merge, settle, observe, unmerge.
measure() {
  local e=$1 t0 now ref_ms tol k dev settled=0 qpss dpss cpu0 cpu n
  local -A ref=()
  local -a rounds0=() pids=() own=()
  mapfile -t pids < <(engine_pids "$e")
  mapfile -t own < <(own_pids "$e")

  read_counters "$e"
  qpss=$(pss_kib "${QEMU_PIDS[@]}")
  dpss=$(pss_kib "${own[@]}")
  R[$e.pss_qemu_before_kib]=$qpss
  guest_ram_kib "$e" before
  R[$e.pss_engine_before_kib]=$dpss
  say "$e: before merging: PSS of the QEMUs $(mib "$qpss") MiB$([ "$e" = samepage ] && echo ", samepage's processes $(mib "$dpss") MiB")"

  cpu0=$(engine_cpu_ns "$e")
  for n in 1 2; do rounds0[n]=$(rounds_ok "$n"); done
  R[$e.rounds_before]="${rounds0[1]}/${rounds0[2]}"
  local tl=$WORK/timeline-$e.tsv
  printf 't_s\tpages_shared\tpages_sharing\tksm_zero_pages\tfull_scans\tpages_unshared\tpages_volatile\tpss_kib\tcpu_ms\trounds_ok\n' >"$tl"

  t0=$(now_ms)
  set_knob "$e" run 1
  say "$e: run=1 (pages_to_scan=$PAGES_TO_SCAN, sleep_millisecs=0, use_zero_pages=$USE_ZERO_PAGES); settled = pages_shared, pages_sharing and ksm_zero_pages each within max($TOL_MIN pages, $TOL_PERMILLE permille of the saved pages) for ${SETTLE_SECS} s and $SETTLE_SCANS full scans"
  ref_ms=$t0
  read_counters "$e"
  local scans0=${C[full_scans]}
  for k in pages_shared pages_sharing ksm_zero_pages full_scans; do ref[$k]=${C[$k]}; done
  local last_print=0
  while :; do
    sleep 1
    check_guests
    for n in 1 2; do kill -0 "${QEMU_PIDS[$((n - 1))]}" 2>/dev/null || die "guest $n's QEMU exited while merging (console: $WORK/guest$n.log)."; done
    read_counters "$e"
    now=$(now_ms)
    cpu=$(($(engine_cpu_ns "$e") - cpu0))
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(secs $((now - t0)))" "${C[pages_shared]}" \
      "${C[pages_sharing]}" "${C[ksm_zero_pages]}" "${C[full_scans]}" "${C[pages_unshared]}" \
      "${C[pages_volatile]}" "$(pss_kib "${pids[@]}")" $((cpu / 1000000)) \
      "$(rounds_ok 1)/$(rounds_ok 2)" >>"$tl"
    tol=$(((ref[pages_sharing] + ref[ksm_zero_pages]) * TOL_PERMILLE / 1000))
    [ "$tol" -ge "$TOL_MIN" ] || tol=$TOL_MIN
    dev=0
    for k in pages_shared pages_sharing ksm_zero_pages; do
      local d=$((C[$k] - ref[$k]))
      [ "${d#-}" -le "$tol" ] || dev=1
    done
    if [ "$dev" = 1 ]; then
      ref_ms=$now
      for k in pages_shared pages_sharing ksm_zero_pages full_scans; do ref[$k]=${C[$k]}; done
    elif [ $((now - ref_ms)) -ge $((SETTLE_SECS * 1000)) ] && [ $((C[full_scans] - ref[full_scans])) -ge "$SETTLE_SCANS" ]; then
      settled=1
      break
    fi
    if [ $((now - last_print)) -ge 10000 ]; then
      say "$e: $(secs $((now - t0))) s: pages_shared ${C[pages_shared]} pages_sharing ${C[pages_sharing]} ksm_zero_pages ${C[ksm_zero_pages]} full_scans ${C[full_scans]}"
      last_print=$now
    fi
    [ $((now - t0)) -lt $((SETTLE_TIMEOUT * 1000)) ] || break
  done
  [ "$settled" = 1 ] || die "$e: the counters did not settle in $SETTLE_TIMEOUT s (timeline: $tl)."
  # The figures at the moment it was found settled; the time to settle is to the start of the
  # quiet window (the last change beyond the tolerance).
  R[$e.settle_s]=$(secs $((ref_ms - t0)))
  R[$e.settle_full_scans]=$((ref[full_scans] - scans0))
  R[$e.detected_s]=$(secs $((now - t0)))
  for k in "${KSM_FIELDS[@]}"; do R[$e.$k]=${C[$k]}; done
  R[$e.cpu_detected_s]=$(awk -v ns="$cpu" 'BEGIN { printf "%.2f", ns / 1e9 }')
  R[$e.cpu_to_settle_s]=$(awk -v t="${R[$e.settle_s]}" 'BEGIN { c = 0 }
    NR > 1 && $1 <= t + 0.0001 { c = $9 } END { printf "%.2f", c / 1000 }' "$tl")
  # The first sample that saved 99 % of what the settled counters save.
  R[$e.t99_s]=$(awk -v goal=$(((C[pages_sharing] + C[ksm_zero_pages]) * 99 / 100)) '
    NR > 1 && $3 + $4 >= goal { print $1; exit }' "$tl")
  qpss=$(pss_kib "${QEMU_PIDS[@]}")
  dpss=$(pss_kib "${own[@]}")
  R[$e.pss_qemu_after_kib]=$qpss
  guest_ram_kib "$e" after
  R[$e.pss_engine_after_kib]=$dpss
  for n in 1 2; do R[$e.proc$n]=$(proc_stat "$e" "${QEMU_PIDS[$((n - 1))]}"); done
  say "$e: settled after ${R[$e.settle_s]} s (found at ${R[$e.detected_s]} s): pages_shared ${C[pages_shared]} pages_sharing ${C[pages_sharing]} ksm_zero_pages ${C[ksm_zero_pages]}; PSS of the QEMUs $(mib "$qpss") MiB"
  for n in 1 2; do say "$e: guest $n ksm_stat: ${R[$e.proc$n]}"; done

  # The guests keep working while merged.
  local r1 r2
  r1=$(rounds_ok 1)
  r2=$(rounds_ok 2)
  say "$e: watching the merged guests for $OBSERVE s"
  local end=$(($(now_ms) + OBSERVE * 1000))
  while [ "$(now_ms)" -lt "$end" ]; do
    sleep 1
    check_guests
  done
  read_counters "$e"
  R[$e.rounds_merged]="$(($(rounds_ok 1) - rounds0[1]))/$(($(rounds_ok 2) - rounds0[2]))"
  R[$e.rounds_observed]="$(($(rounds_ok 1) - r1))/$(($(rounds_ok 2) - r2))"
  R[$e.observe_end]="pages_shared ${C[pages_shared]} pages_sharing ${C[pages_sharing]} ksm_zero_pages ${C[ksm_zero_pages]}"
  R[$e.cpu_total_s]=$(awk -v ns="$(($(engine_cpu_ns "$e") - cpu0))" 'BEGIN { printf "%.2f", ns / 1e9 }')
  R[$e.merged_wall_s]=$(secs $(($(now_ms) - t0)))
  say "$e: while merged (${R[$e.merged_wall_s]} s) the guests checked all their data ${R[$e.rounds_merged]} times, all ok; at the end: ${R[$e.observe_end]}"
  if [ "$(($(rounds_ok 1) - r1))" -le 0 ] || [ "$(($(rounds_ok 2) - r2))" -le 0 ]; then
    die "$e: a guest completed no round in the $OBSERVE s after settling."
  fi

  # Unmerge everything, and the guests go on.
  local tu
  tu=$(now_ms)
  set_knob "$e" run 2
  R[$e.unmerge_s]=$(secs $(($(now_ms) - tu)))
  read_counters "$e"
  R[$e.after_unmerge]="pages_shared ${C[pages_shared]} pages_sharing ${C[pages_sharing]} ksm_zero_pages ${C[ksm_zero_pages]}"
  for n in 1 2; do
    local last
    last=$(grep -o 'round [0-9]* ok' "$WORK/guest$n.log" | tail -n 1 | cut -d' ' -f2)
    wait_lines "samepage-guest .* round $((last + 1)) ok" 120 "$n"
  done
  check_guests
  say "$e: run=2 unmerged everything in ${R[$e.unmerge_s]} s (${R[$e.after_unmerge]}); both guests checked their data again: ok"
  set_knob "$e" run 0
}

# ---------------------------------------------------------------------------------------------
# The phases

guest_times() {
  R[$1.boot_s]="$(secs "${BOOT_MS[1]}")/$(secs "${BOOT_MS[2]}")"
  R[$1.ready_s]="$(secs "${READY_MS[1]}")/$(secs "${READY_MS[2]}")"
  R[$1.ram_mergeable]="${GUEST_RAM_MG[1]}/${GUEST_RAM_MG[2]}"
}

kernel_phase() {
  say "kernel phase: two guests under the host kernel's KSM"
  take_ksm
  KSMD_PID=$(find_ksmd)
  [ -n "$KSMD_PID" ] || die "found no ksmd thread."
  echo "$PAGES_TO_SCAN" >"$KSM/pages_to_scan"
  echo 0 >"$KSM/sleep_millisecs"
  echo "$USE_ZERO_PAGES" >"$KSM/use_zero_pages"
  boot_guests kernel
  guest_times kernel
  measure kernel
  stop_guests
  restore_ksm
  release_lock
}

check_samepage_binary() {
  [ -x "$SAMEPAGE" ] || die "no samepage binary at $SAMEPAGE: build it (cargo build --release) or pass --samepage PATH."
  local sub
  for sub in daemon run ctl; do
    "$SAMEPAGE" "$sub" --help >/dev/null 2>&1 ||
      die "$SAMEPAGE has no '$sub' subcommand: this build of samepage cannot merge across processes yet (issue 11's samepage daemon, run, ctl and stat --daemon), so --engine samepage cannot run; use --engine kernel."
  done
}

samepage_phase() {
  say "samepage phase: two guests under samepage run, merged by samepage daemon"
  local run
  run=$(cat "$KSM/run" 2>/dev/null || echo 0)
  [ "$run" = 0 ] || die "the host's KSM is running (run=$run): it would merge QEMU's memory behind samepage; stop it first."
  SOCK=$WORK/samepage.sock
  rm -f "$SOCK"
  setpriv --pdeathsig KILL "$SAMEPAGE" daemon --socket "$SOCK" --set use_zero_pages="$USE_ZERO_PAGES" \
    --set pages_to_scan="$PAGES_TO_SCAN" --set sleep_millisecs=0 \
    --prometheus "$WORK/daemon.prom" </dev/null >"$WORK/daemon.log" 2>&1 9>&- &
  DAEMON_PID=$!
  local i
  for i in $(seq 100); do
    [ -S "$SOCK" ] && break
    kill -0 "$DAEMON_PID" 2>/dev/null || die "samepage daemon exited: $(tail -n 3 "$WORK/daemon.log")"
    sleep 0.1
  done
  [ -S "$SOCK" ] || die "samepage daemon made no socket at $SOCK in 10 s (log: $WORK/daemon.log)."
  say "samepage daemon pid $DAEMON_PID on $SOCK (log: $WORK/daemon.log)"
  boot_guests samepage
  guest_times samepage
  read_counters samepage
  local n
  for n in 1 2; do
    jq -e --argjson pid "${QEMU_PIDS[$((n - 1))]}" '.ksm_stat[] | select(.pid == $pid)' \
      "$WORK/samepage-stat.json" >/dev/null ||
      die "the daemon lists no ksm_stat entry for guest $n's QEMU (pid ${QEMU_PIDS[$((n - 1))]}): its madvise did not reach the daemon."
    say "guest $n: the daemon has QEMU pid ${QEMU_PIDS[$((n - 1))]} as a client"
  done
  measure samepage
  stop_guests
  stop_pid "$DAEMON_PID"
  DAEMON_PID=""
}

# ---------------------------------------------------------------------------------------------
# Report

print_table() {
  local engines=("$@") e
  printf '\n%-44s' "two guests x $MEM MiB (TCG)"
  for e in "${engines[@]}"; do printf '%14s' "$e"; done
  printf '\n'
  row() { # label key [kind]
    local label=$1 key=$2 kind=${3:-} v k
    printf '%-44s' "$label"
    for e in "${engines[@]}"; do
      v=${R[$e.$key]:-} k=$kind
      # The kernel has no process of its own: its column is empty, and the next is not.
      case $e.$key in kernel.pss_engine_*) v=- k="" ;; esac
      case $k in
        mib) v=$(mib "$v") ;;
      esac
      printf '%14s' "$v"
    done
    printf '\n'
  }
  for e in "${engines[@]}"; do
    R[$e.saved_mib]=$(awk -v p=$((R[$e.pages_sharing] + R[$e.ksm_zero_pages])) 'BEGIN { printf "%.1f", p * 4 / 1024 }')
    R[$e.thp_splits]=$((R[$e.thp_split_page_after] - R[$e.thp_split_page_before]))
    R[$e.thp_collapses]=$((R[$e.thp_collapse_alloc_after] - R[$e.thp_collapse_alloc_before]))
    R[$e.pss_before_kib]=$((R[$e.pss_qemu_before_kib] + R[$e.pss_engine_before_kib]))
    R[$e.pss_after_kib]=$((R[$e.pss_qemu_after_kib] + R[$e.pss_engine_after_kib]))
  done
  row "guest boot to /init (s, guest 1/2)" boot_s
  row "guest data written, checked once (s)" ready_s
  row "pages_shared" pages_shared
  row "pages_sharing" pages_sharing
  row "ksm_zero_pages" ksm_zero_pages
  row "saved (MiB) = pages_sharing + ksm_zero_pages" saved_mib
  row "pages_unshared" pages_unshared
  row "general_profit (bytes)" general_profit
  row "RSS of the guest RAM mappings before (MiB)" ram_rss_before_kib mib
  row "RSS of the guest RAM mappings after (MiB)" ram_rss_after_kib mib
  row "PSS of the guest RAM mappings before (MiB)" ram_pss_before_kib mib
  row "PSS of the guest RAM mappings after (MiB)" ram_pss_after_kib mib
  row "guest RAM pages on the zero page, before" ram_zero_pages_before
  row "guest RAM pages on the zero page, after" ram_zero_pages_after
  row "THPs split meanwhile (host, /proc/vmstat)" thp_splits
  row "THPs collapsed by khugepaged meanwhile (host)" thp_collapses
  row "PSS of the QEMUs before (MiB)" pss_qemu_before_kib mib
  row "PSS of the QEMUs after (MiB)" pss_qemu_after_kib mib
  row "PSS of samepage's processes after (MiB)" pss_engine_after_kib mib
  row "PSS in all, before (MiB)" pss_before_kib mib
  row "PSS in all, after (MiB)" pss_after_kib mib
  row "time to 99 % of the settled saving (s)" t99_s
  row "time to settle (s)" settle_s
  row "full scans to settle" settle_full_scans
  row "engine CPU to settle (s)" cpu_to_settle_s
  row "engine CPU while merged (s)" cpu_total_s
  row "time merged (s)" merged_wall_s
  row "guest rounds ok while merged (1/2)" rounds_merged
  row "unmerge, run=2 (s)" unmerge_s
  printf '%s\n' "(engine CPU: ksmd's, or samepage daemon's threads, from schedstat; ksmd at sleep_millisecs=0 keeps scanning after settling)"
}

write_json() {
  local engines=("$@") e k first=1
  {
    printf '{\n  "date": "%s",\n  "host_kernel": "%s",\n  "qemu": "%s",\n  "guest_kernel": "%s",\n' \
      "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(uname -r)" "$QEMU_VERSION" "$(basename "$KERNEL")"
    printf '  "config": {"memory_mib": %s, "common_mib": %s, "unique_mib": %s, "free_mib": %s, "scratch_kib": %s, "init_on_free": %s, "use_zero_pages": %s, "pages_to_scan": %s, "settle_seconds": %s, "settle_scans": %s, "tolerance_pages": %s, "tolerance_permille": %s, "observe_seconds": %s}' \
      "$MEM" "$COMMON" "$UNIQUE" "$FREE" "$SCRATCH" "$INIT_ON_FREE" "$USE_ZERO_PAGES" "$PAGES_TO_SCAN" "$SETTLE_SECS" \
      "$SETTLE_SCANS" "$TOL_MIN" "$TOL_PERMILLE" "$OBSERVE"
    for e in "${engines[@]}"; do
      printf ',\n  "%s": {' "$e"
      first=1
      for k in pages_shared pages_sharing ksm_zero_pages pages_unshared pages_volatile full_scans \
        general_profit saved_mib pss_qemu_before_kib pss_qemu_after_kib pss_engine_before_kib \
        pss_engine_after_kib pss_before_kib pss_after_kib ram_rss_before_kib ram_rss_after_kib \
        ram_pss_before_kib ram_pss_after_kib thp_splits thp_collapses t99_s settle_s settle_full_scans detected_s \
        cpu_to_settle_s cpu_detected_s cpu_total_s merged_wall_s unmerge_s; do
        [ "$first" = 1 ] || printf ', '
        first=0
        printf '"%s": %s' "$k" "${R[$e.$k]}"
      done
      for k in boot_s ready_s ram_mergeable ram_zero_pages_before ram_zero_pages_after rounds_before rounds_merged rounds_observed observe_end after_unmerge proc1 proc2; do
        printf ', "%s": "%s"' "$k" "${R[$e.$k]}"
      done
      printf '}'
    done
    printf '\n}\n'
  } >"$JSON"
  say "wrote $JSON"
}

# ---------------------------------------------------------------------------------------------

if [ "$RESTORE" = 1 ]; then
  restore_saved_file
  exit 0
fi
check_saved_file
[ "$ENGINE" = kernel ] || check_samepage_binary
prepare
say "host: $(uname -r), $(nproc) cores; host KSM as found: $(for k in "${KNOBS[@]}"; do printf '%s=%s ' "$k" "$(cat "$KSM/$k")"; done)"
ENGINES=()
if [ "$ENGINE" != samepage ]; then kernel_phase; ENGINES+=(kernel); fi
if [ "$ENGINE" != kernel ]; then samepage_phase; ENGINES+=(samepage); fi
print_table "${ENGINES[@]}"
[ -z "$JSON" ] || write_json "${ENGINES[@]}"
say "logs: $WORK/guest1.log $WORK/guest2.log, timelines: $WORK/timeline-*.tsv"
