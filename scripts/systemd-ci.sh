#!/usr/bin/env bash
# A real systemd (PID 1 of its own PID + mount namespace) for tests/test_systemd_real.py.
#
#   scripts/systemd-ci.sh start DIR [RO...]  boot systemd in new namespaces, everything it writes kept in DIR;
#                                            each RO folder is bound read-only at /opt/ro/1, /opt/ro/2, ...
#                                            inside; wait until it has booted; prints
#                                            `export CARDIACSEG_SYSTEMD_PID=N` (its PID 1, as this side sees it)
#   scripts/systemd-ci.sh exec DIR CMD...    run CMD inside (as root): systemctl, journalctl, runuser, ...
#   scripts/systemd-ci.sh stop DIR           SIGKILL its PID 1 (every process inside ends with it), remove
#                                            the cgroups it left
#
# Inside, the host's files are never written: /etc and /var are overlays whose upper layers live in DIR
# (units, the service user, /etc/cardiacseg-train, /var/lib/cardiacseg-train, the journal), /tmp, /var/tmp
# and /run are private tmpfs, and DIR/opt is /opt (the service's venv and data: reachable by the service
# user, outside /tmp, which its PrivateTmp=yes hides). The boot target is a minimal one (basic.target), and
# the units that would reach the host through what a mount namespace does not separate are masked: the
# clock (timesyncd), the kernel's settings (sysctl, binfmt, modules), /dev (tmpfiles-setup-dev), the
# pstore, the disks (repart, fsck, fstrim and the other timers), and systemd-tmpfiles, which at boot empties
# /tmp (with a shared /tmp that destroyed the host's /tmp: see /work/shared/systemd-facts.md). `container=`
# tells systemd it is not the machine's manager (ConditionVirtualization=!container units stay off), and
# /dev/console is /dev/null inside, so nothing is written to the host's console.
# Exit codes of start: 0 booted; 3 cannot (not root, no unshare, no systemd: the tests skip, naming why).
set -euo pipefail

SYSTEMD=/lib/systemd/systemd
MASK=(systemd-timesyncd.service systemd-sysctl.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount
      proc-sys-fs-binfmt_misc.mount systemd-modules-load.service kmod-static-nodes.service
      systemd-tmpfiles-setup-dev.service systemd-tmpfiles-setup.service systemd-tmpfiles-clean.service
      systemd-tmpfiles-clean.timer systemd-random-seed.service systemd-pstore.service systemd-repart.service
      systemd-firstboot.service systemd-machine-id-commit.service systemd-pcrphase.service
      systemd-pcrphase-sysinit.service systemd-journal-flush.service systemd-remount-fs.service
      systemd-fsck-root.service systemd-hwdb-update.service systemd-udevd.service systemd-udev-trigger.service
      systemd-journal-catalog-update.service systemd-update-done.service ldconfig.service timers.target
      sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount dev-hugepages.mount
      dev-mqueue.mount sys-fs-fuse-connections.mount getty.target remote-fs.target cryptsetup.target
      integritysetup.target veritysetup.target systemd-ask-password-console.path systemd-ask-password-wall.path
      systemd-journald-audit.socket e2scrub_reap.service)

mode=${1:-}
S=${2:-}
if [[ -z "$mode" || -z "$S" ]]; then
    echo "usage: $0 start|exec|stop DIR ..." >&2
    exit 2
fi
shift 2
say() { echo "systemd-ci: $*" >&2; }

if [[ "$mode" == boot ]]; then
    # PID 1 of the new namespaces, before it becomes systemd. Order matters: the read-only folders and DIR
    # are bound before the private /tmp hides a source under /tmp.
    # its own cgroup in every hierarchy, which systemd then takes as its root (as in a container): it
    # never manages the machine's root cgroup, and `stop` removes the whole subtree
    cg=$1
    shift
    for h in /sys/fs/cgroup/*/; do
        [[ -e "${h}cgroup.procs" ]] || continue
        mkdir -p "$h$cg"
        if [[ -e "$h${cg}/cpuset.cpus" ]]; then  # a new cpuset is empty: attaching to it fails
            cat "${h}cpuset.cpus" >"$h$cg/cpuset.cpus"
            cat "${h}cpuset.mems" >"$h$cg/cpuset.mems"
        fi
        echo $$ >"$h$cg/cgroup.procs"
    done
    mount --make-rprivate /
    i=0
    for src in "$@"; do
        i=$((i + 1))
        mkdir -p "$S/opt/ro/$i"
        mount --bind "$src" "$S/opt/ro/$i"
        mount -o remount,bind,ro "$S/opt/ro/$i"
    done
    mount --rbind "$S/opt" /opt
    for d in etc var; do
        mkdir -p "$S/upper/$d" "$S/work/$d"
        mount -t overlay overlay -o "lowerdir=/$d,upperdir=$S/upper/$d,workdir=$S/work/$d" "/$d"
    done
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /var/tmp
    mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
    mount --bind /dev/null /dev/console
    mount --bind /proc/sys /proc/sys
    mount -o remount,bind,ro /proc/sys
    units=/etc/systemd/system
    mkdir -p "$units"
    for u in "${MASK[@]}"; do
        ln -sfn /dev/null "$units/$u"
    done
    cat >"$units/cardiacseg-ci.target" <<'EOF'
[Unit]
Description=cardiacseg-train CI: the base system (journald), none of the installed packages' services
Requires=basic.target
After=basic.target
AllowIsolate=yes
EOF
    mkdir -p /etc/systemd/journald.conf.d
    printf '[Journal]\nReadKMsg=no\n' >/etc/systemd/journald.conf.d/cardiacseg-ci.conf  # not the host's kernel log
    hostname cardiacseg-ci
    exec env -i container=cardiacseg-ci "$SYSTEMD" --system --unit=cardiacseg-ci.target --log-target=journal
fi

S=$(mkdir -p "$S" && cd "$S" && pwd)
pid_of() { [[ -s "$S/systemd.pid" ]] && cat "$S/systemd.pid"; }
inside() { nsenter -t "$(pid_of)" -m -p -u --wd=/ -- "$@"; }

if [[ "$mode" == exec ]]; then
    [[ -n "$(pid_of)" ]] || { say "not started (no $S/systemd.pid)"; exit 3; }
    inside "$@"
    exit $?
fi

if [[ "$mode" == stop ]]; then
    pid=$(pid_of || true)
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        cg=$(sed -n 's/^[0-9]*:name=systemd:\(.*\)\/init\.scope$/\1/p' "/proc/$pid/cgroup" 2>/dev/null || true)
        kill -KILL "$pid"
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        # the cgroup boot made in every hierarchy, and those systemd made below it: all empty now
        if [[ "$cg" == /cardiacseg-ci-* ]]; then
            for h in /sys/fs/cgroup/*/; do
                [[ -d "$h${cg#/}" ]] && find "$h${cg#/}" -depth -type d -exec rmdir {} + 2>/dev/null || true
            done
        fi
    fi
    rm -f "$S/systemd.pid"
    say "stopped (scratch $S)"
    exit 0
fi
[[ "$mode" == start ]] || { echo "usage: $0 start|exec|stop DIR ..." >&2; exit 2; }

[[ $(id -u) -eq 0 ]] || { say "booting systemd in a namespace needs root"; exit 3; }
command -v unshare >/dev/null && command -v nsenter >/dev/null || { say "unshare/nsenter (util-linux) absent"; exit 3; }
if [[ ! -x "$SYSTEMD" ]]; then
    command -v apt-get >/dev/null || { say "$SYSTEMD absent and no apt-get to install it"; exit 3; }
    say "installing systemd (apt-get)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd; } >"$S/apt.log" 2>&1 \
        || { say "apt-get install systemd failed (see $S/apt.log)"; exit 3; }
fi
[[ -z "$(pid_of || true)" ]] || { say "already started (pid $(pid_of)); stop it first"; exit 3; }
chmod 0755 "$S"
mkdir -p "$S/opt"
chmod 0755 "$S/opt"
for src in "$@"; do
    [[ -d "$src" ]] || { say "read-only folder $src does not exist"; exit 3; }
done
cgroup=cardiacseg-ci-$(echo "$S" | md5sum | cut -c1-12)
setsid unshare --pid --fork --mount --uts --mount-proc -- bash "$(readlink -f "$0")" boot "$S" "$cgroup" "$@" \
    </dev/null >"$S/boot.log" 2>&1 &
outer=$!
deadline=$((SECONDS + 30))
until pid=$(cat "/proc/$outer/task/$outer/children" 2>/dev/null) && [[ -n "${pid// /}" ]] \
        && [[ "$(readlink "/proc/${pid// /}/exe" 2>/dev/null)" == */systemd ]]; do
    if ! kill -0 "$outer" 2>/dev/null || ((SECONDS > deadline)); then
        say "systemd did not start: $(tail -c 600 "$S/boot.log")"
        exit 3
    fi
    sleep 0.05
done
pid=${pid// /}
echo "$pid" >"$S/systemd.pid"
deadline=$((SECONDS + 60))
until state=$(inside systemctl is-system-running 2>/dev/null) || [[ "$state" == degraded ]]; do
    if ((SECONDS > deadline)) || ! kill -0 "$pid" 2>/dev/null; then
        say "systemd did not finish booting within 60 s (state: ${state:-no answer}): $(tail -c 600 "$S/boot.log")"
        "$0" stop "$S" >&2 || true
        exit 3
    fi
    sleep 0.1
done
if [[ "$state" == degraded ]]; then
    say "booted degraded; failed units: $(inside systemctl --failed --no-legend --plain | tr '\n' ' ')"
fi
say "booted: systemd pid $pid (PID 1 inside), scratch $S"
echo "export CARDIACSEG_SYSTEMD_PID=$pid"
