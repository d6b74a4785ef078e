#!/bin/sh
# dispo guest init: PID 1 of a disposable microVM (kernel arg init=/usr/lib/dispo/init).
#
# A full init system costs ~5 s of boot under TCG and brings nothing a disposable session needs, so this
# script does the few things that matter: mount the API filesystems, apply the session settings that dispo
# passes on the kernel command line (dispo.ip, dispo.gw, dispo.dns, dispo.mac, dispo.hostname), start the
# guest agent and sshd, reap orphans, and power off on the ACPI power button (QMP system_powerdown) or
# SIGUSR2/SIGTERM.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
umask 022

say() { echo "dispo-init: $*" > /dev/console; }

# initramfs-tools moves /proc, /sys and /dev into the root; mount them when booted without an initrd.
[ -e /proc/self ] || mount -t proc -o nosuid,nodev,noexec proc /proc
[ -d /sys/kernel ] || mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
grep -q " /dev " /proc/mounts || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
ln -sfn /proc/self/fd /dev/fd
ln -sfn /proc/self/fd/0 /dev/stdin
ln -sfn /proc/self/fd/1 /dev/stdout
ln -sfn /proc/self/fd/2 /dev/stderr
mount -o remount,rw /
mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs /run
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
mkdir -p /run/sshd /run/lock
chmod 0755 /run/sshd

# The guest agent (docs/templates.md): it listens on a host-only channel (virtio-serial or vsock), never on
# the network. Started first, so it loads while the rest is set up; it answers the host only once
# /run/dispo-ready exists (below), and that answer is what makes the guest ready.
[ -x /usr/lib/dispo/agent ] && /usr/lib/dispo/agent < /dev/null > /dev/console 2>&1 &

# The value of kernel argument $1 (dispo.ip=... -> ...), empty if absent.
arg() {
    for w in $(cat /proc/cmdline); do
        case "$w" in "$1="*) echo "${w#*=}"; return 0 ;; esac
    done
    return 0
}

# /dev/shm sized for the app (browsers keep their compositor buffers there): dispo.shm=MiB.
shm=$(arg dispo.shm)
case "$shm" in
    ''|*[!0-9]*) ;;
    *) mount -o remount,size="${shm}m" /dev/shm ;;
esac

name=$(arg dispo.hostname)
[ -n "$name" ] || name=dispo
hostname "$name"
echo "$name" > /etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' "$name" > /etc/hosts

# No IPv6 on the network: dispo gives guests IPv4 behind NAT only, and a kernel with IPv6 sends router and
# neighbour solicitations (and MLD reports) on its own, traffic no one asked for (docs/quiet.md). The loopback
# keeps ::1 (sshd's X11 forwarding binds it, and so may apps); "all" would take it too.
for f in /proc/sys/net/ipv6/conf/*/disable_ipv6; do
    case "$f" in */conf/lo/*|*/conf/all/*) continue ;; esac
    [ -e "$f" ] && echo 1 > "$f"
done

ip link set lo up
ip_addr=$(arg dispo.ip)
if [ -n "$ip_addr" ]; then
    mac=$(arg dispo.mac)
    dev=
    # The interface whose MAC is dispo.mac, else the first one that is not lo.
    for n in /sys/class/net/*; do
        [ "${n##*/}" = lo ] && continue
        if [ -z "$mac" ] || [ "$(cat "$n/address")" = "$mac" ]; then dev=${n##*/}; break; fi
    done
    if [ -n "$dev" ]; then
        ip addr add "$ip_addr" dev "$dev"
        ip link set "$dev" up
        gw=$(arg dispo.gw)
        [ -n "$gw" ] && ip route add default via "$gw" dev "$dev"
        say "network $dev $ip_addr via ${gw:-none}"
    else
        say "no network interface for dispo.ip=$ip_addr (mac ${mac:-any})"
    fi
fi
dns=$(arg dispo.dns)
: > /etc/resolv.conf
for r in $(echo "$dns" | tr ',' ' '); do echo "nameserver $r" >> /etc/resolv.conf; done

# The host's time zone (or the profile's): dispo.tz=Area/City, when the image has its zoneinfo.
tz=$(arg dispo.tz)
case "$tz" in
    ''|*[!A-Za-z0-9_+/-]*|*..*|/*) ;;
    *) [ -f "/usr/share/zoneinfo/$tz" ] && ln -sfn "/usr/share/zoneinfo/$tz" /etc/localtime && echo "$tz" > /etc/timezone ;;
esac
# Browser images: the session's language and privacy choices (browser-setup.sh, docs/quiet.md).
if [ -x /usr/lib/dispo/browser-setup ]; then
    /usr/lib/dispo/browser-setup "$(arg dispo.lang)" "$(arg dispo.quiet)" "$(arg dispo.allow)" > /dev/console 2>&1
fi

power_off() {
    say "powering off"
    kill -TERM -1 2>/dev/null
    sync
    echo u > /proc/sysrq-trigger   # remount read-only
    echo o > /proc/sysrq-trigger   # ACPI power off (QEMU exits)
    sleep 2
    echo b > /proc/sysrq-trigger   # no ACPI: reboot, which -no-reboot turns into an exit
}
trap power_off TERM USR2 PWR

# The ACPI power button shows up as an input device; any event on it means "power off". Watched before
# sshd starts, so a guest that answers SSH also hears the button (dispo repeats the press anyway). On arm64
# (QEMU's virt machine, no ACPI) the button is a GPIO key, input device "gpio-keys".
modprobe -q button 2>/dev/null
modprobe -q evdev 2>/dev/null
for d in /sys/class/input/event*; do
    [ -e "$d/device/name" ] || continue
    if [ "$(cat "$d/device/name")" = "Power Button" ] || [ "$(cat "$d/device/name")" = gpio-keys ]; then
        ( dd if="/dev/input/${d##*/}" of=/dev/null bs=24 count=1 2>/dev/null; kill -USR2 1 ) &
    fi
done

# Set up: the agent may answer (a command needs no sshd; the display and `dispo ssh` wait for it).
: > /run/dispo-ready

# dispo writes a per-session host key into the disk before boot; make one if booted some other way.
[ -s /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
/usr/sbin/sshd -e 2>/dev/console && say "sshd started"

say "ready"
# PID 1 must never exit (that panics the kernel) and must reap orphans: 'wait' does both, and a trapped
# signal interrupts it at once.
while :; do
    sleep 10 &
    wait
done
