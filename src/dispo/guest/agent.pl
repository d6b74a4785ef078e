#!/usr/bin/perl
# dispo-agent: the in-guest half of giving a restored clone its own identity (docs/templates.md).
#
# It listens on a host-only channel: the virtio-serial port named "dispo.agent" (QEMU), or vsock port
# 1024 (Firecracker). There is no network path to it. Perl because perl-base is in every Debian image
# (Essential) and can make the two ioctls the RNG reseed needs; nothing beyond perl-base is used.
#
# The protocol: one ASCII line per request, at most 8192 bytes, words separated by one space; one reply
# line per request, "ok[ DATA]" or "err REASON". Every argument is checked against a strict pattern;
# anything else is answered with "err" and changes nothing.
#   hello 1 TOKEN                   -> ok dispo-agent 1 TOKEN (TOKEN: 8 to 32 hex digits; the host resends
#                                      until its latest token comes back, so no stale reply is mistaken)
#   entropy HEX                     32..512 bytes from the host: mixed into the kernel's pool, credited,
#                                   and the CRNG reseeded at once (RNDADDENTROPY, RNDRESEEDCRNG)
#   clock SECONDS NANOSECONDS       the wall clock stepped to the host's
#   hostname NAME                   [a-z0-9-]{1,63}: hostname, /etc/hostname, /etc/hosts
#   host-key HEX                    the new SSH host key (OpenSSH private key file); sshd re-executes on it
#   user-key HEX                    the new authorized_keys line of the session's user
#   net MAC ADDR/PREFIX GATEWAY DNS the network interface re-addressed (DNS: a,b,c or -)
use strict;
use warnings;
use Fcntl qw(O_WRONLY O_CREAT O_EXCL O_NOFOLLOW O_RDWR);
use Socket;

$0 = "dispo-agent";
my $MAX_LINE = 8192;
my $PORT_NAME = "dispo.agent";
my $VSOCK_PORT = 1024;
my $USER_HOME = "/home/user";
my $USER_UID = 1000;
my $HOST_KEY = "/etc/ssh/ssh_host_ed25519_key";
$ENV{PATH} = "/usr/sbin:/usr/bin:/sbin:/bin";

sub say_console { my ($m) = @_; if (open(my $c, '>', '/dev/console')) { print $c "dispo-agent: $m\n"; close $c; } }

sub write_file {
    my ($path, $data, $mode, $uid) = @_;
    my $tmp = "$path.dispo-new";
    unlink $tmp;
    sysopen(my $f, $tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, $mode) or return 0;
    print $f $data or return 0;
    close $f or return 0;
    chmod $mode, $tmp;
    chown $uid, $uid, $tmp if defined $uid;
    return rename $tmp, $path;
}

sub hex_bytes {
    my ($hex, $min, $max) = @_;
    return undef unless defined $hex && $hex =~ /\A(?:[0-9a-f]{2})+\z/;
    my $bytes = pack("H*", $hex);
    return undef if length($bytes) < $min || length($bytes) > $max;
    return $bytes;
}

sub run_ok { return system(@_) == 0; }

# -- requests ---------------------------------------------------------------------------------------
sub do_entropy {
    my ($bytes) = @_;
    open(my $r, '+<', '/dev/urandom') or return "err cannot open /dev/urandom";
    # struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    my $info = pack("i i", 8 * length($bytes), length($bytes)) . $bytes;
    ioctl($r, 0x40085203, $info) or return "err RNDADDENTROPY: $!";   # _IOW('R', 0x03, int[2])
    ioctl($r, 0x5207, 0) or return "err RNDRESEEDCRNG: $!";            # _IO('R', 0x07)
    close $r;
    return "ok";
}

sub do_clock {
    my ($sec, $nsec) = @_;
    return "err bad clock" unless $sec =~ /\A[0-9]{1,12}\z/ && $nsec =~ /\A[0-9]{1,9}\z/;
    my $when = sprintf('@%d.%09d', $sec, $nsec);
    return run_ok("date", "-u", "-s", $when) ? "ok" : "err date failed";
}

sub do_hostname {
    my ($name) = @_;
    return "err bad hostname" unless $name =~ /\A[a-z0-9][a-z0-9-]{0,62}\z/;
    run_ok("hostname", $name) or return "err hostname failed";
    write_file("/etc/hostname", "$name\n", 0644);
    write_file("/etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\t$name\n::1\tlocalhost ip6-localhost ip6-loopback\n",
               0644);
    return "ok";
}

sub do_host_key {
    my ($key) = @_;
    return "err bad host key" unless $key =~ /\A-----BEGIN OPENSSH PRIVATE KEY-----\n[A-Za-z0-9+\/=\n]+-----END OPENSSH PRIVATE KEY-----\n?\z/;
    write_file($HOST_KEY, $key, 0600) or return "err cannot write the host key";
    unlink "$HOST_KEY.pub";
    # sshd loads its host keys for every connection (it re-executes itself per connection); SIGHUP makes the
    # listener re-execute too, so nothing of the template's key stays in any sshd process.
    if (open(my $p, '<', '/run/sshd.pid')) {
        my $pid = <$p>;
        close $p;
        if (defined $pid && $pid =~ /\A([0-9]+)\s*\z/) { kill 'HUP', $1 or return "err sshd did not take the new key"; }
    }
    return "ok";
}

sub do_user_key {
    my ($line) = @_;
    return "err bad user key" unless $line =~ /\Assh-ed25519 [A-Za-z0-9+\/=]{40,200}(?: [\x21-\x7e]{1,100})?\n?\z/;
    $line .= "\n" unless $line =~ /\n\z/;
    mkdir "$USER_HOME/.ssh", 0700;
    write_file("$USER_HOME/.ssh/authorized_keys", $line, 0600, $USER_UID) or return "err cannot write authorized_keys";
    return "ok";
}

sub do_net {
    my ($mac, $addr, $gw, $dns) = @_;
    return "err bad mac" unless $mac =~ /\A[0-9a-f]{2}(?::[0-9a-f]{2}){5}\z/;
    my $octet = qr/(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])/;
    my $ip = qr/$octet\.$octet\.$octet\.$octet/;
    return "err bad address" unless $addr =~ /\A$ip\/(?:[0-9]|[12][0-9]|3[0-2])\z/;
    return "err bad gateway" unless $gw =~ /\A$ip\z/;
    return "err bad dns" unless $dns eq "-" || $dns =~ /\A$ip(?:,$ip){0,3}\z/;
    my $dev;
    for my $n (sort glob "/sys/class/net/*") {
        my ($name) = $n =~ m{([^/]+)\z};
        next if $name eq "lo";
        $dev = $name;
        last;
    }
    return "err no network interface" unless defined $dev && $dev =~ /\A[A-Za-z0-9_.-]{1,15}\z/;
    # One ip process for all of it (each process costs under emulation); it stops at the first failure.
    open(my $batch, "|-", "ip", "-batch", "-") or return "err cannot run ip";
    print $batch join("", map { "$_\n" } (
        "addr flush dev $dev", "link set dev $dev down", "link set dev $dev address $mac", "link set dev $dev up",
        "addr add $addr dev $dev", "route replace default via $gw dev $dev", "neigh flush dev $dev"));
    close $batch or return "err re-addressing $dev failed";
    my $conf = $dns eq "-" ? "" : join("", map { "nameserver $_\n" } split(/,/, $dns));
    write_file("/etc/resolv.conf", $conf, 0644) or return "err cannot write resolv.conf";
    return "ok";
}

sub handle {
    my ($line) = @_;
    my @w = split(/ /, $line, -1);
    my $cmd = shift(@w) // "";
    if ($cmd eq "hello" && @w == 2 && $w[0] eq "1" && $w[1] =~ /\A[0-9a-f]{8,32}\z/) { return "ok dispo-agent 1 $w[1]"; }
    if ($cmd eq "entropy" && @w == 1) {
        my $b = hex_bytes($w[0], 32, 512);
        return defined $b ? do_entropy($b) : "err entropy must be 32 to 512 bytes in hex";
    }
    if ($cmd eq "clock" && @w == 2) { return do_clock(@w); }
    if ($cmd eq "hostname" && @w == 1) { return do_hostname($w[0]); }
    if ($cmd eq "host-key" && @w == 1) {
        my $b = hex_bytes($w[0], 64, 4096);
        return defined $b ? do_host_key($b) : "err host-key must be hex";
    }
    if ($cmd eq "user-key" && @w == 1) {
        my $b = hex_bytes($w[0], 16, 512);
        return defined $b ? do_user_key($b) : "err user-key must be hex";
    }
    if ($cmd eq "net" && @w == 4) { return do_net(@w); }
    return "err unknown request";
}

# -- the channel ------------------------------------------------------------------------------------
sub serve {
    my ($fh) = @_;
    my $buf = "";
    while (1) {
        my $n = sysread($fh, my $chunk, 4096);
        return unless defined $n;   # an error: the caller reopens
        if ($n == 0) { return; }    # the host side closed
        $buf .= $chunk;
        while ((my $i = index($buf, "\n")) >= 0) {
            my $line = substr($buf, 0, $i);
            $buf = substr($buf, $i + 1);
            my $reply = ($line =~ /\A[\x20-\x7e]*\z/) ? handle($line) : "err not printable ascii";
            syswrite($fh, "$reply\n");
        }
        if (length($buf) > $MAX_LINE) { syswrite($fh, "err line too long\n"); $buf = ""; return; }
    }
}

sub find_port {
    for my $d (glob "/sys/class/virtio-ports/*") {
        open(my $f, '<', "$d/name") or next;
        my $name = <$f> // "";
        close $f;
        chomp $name;
        my ($port) = $d =~ m{/(vport[0-9]+p[0-9]+)\z};
        return "/dev/$port" if $name eq $PORT_NAME && defined $port;
    }
    return undef;
}

# Whether the machine has a virtio device of this type (3: console, 19: vsock), from sysfs.
sub virtio_has {
    my ($type) = @_;
    for my $f (glob "/sys/bus/virtio/devices/*/device") {
        open(my $h, '<', $f) or next;
        my $v = <$h> // "";
        close $h;
        return 1 if $v =~ /\A0x([0-9a-f]+)/ && hex($1) == $type;
    }
    return 0;
}

sub main {
    $SIG{PIPE} = 'IGNORE';  # a helper that dies early (ip -batch) must not take the agent with it
    # The channel is whatever device the VMM gave: a virtio console (QEMU) or a vsock (Firecracker). Decided
    # by the hardware, not by what shows up first (the vsock module makes /dev/vsock without any device).
    my $port;
    for (1 .. 200) {
        if (virtio_has(3)) {
            system("modprobe", "-q", "virtio_console");
            last if defined($port = find_port());
        } elsif (virtio_has(19)) {
            system("modprobe", "-q", "vmw_vsock_virtio_transport");
            last if -e "/dev/vsock";
        }
        select(undef, undef, undef, 0.05);
    }
    if (defined $port) {
        say_console("listening on $port");
        while (1) {
            if (sysopen(my $fh, $port, O_RDWR)) {
                serve($fh);
                close $fh;
            }
            # The host side is not connected (or went away): virtio-serial reads return at once, so wait.
            select(undef, undef, undef, 0.1);
        }
    }
    # Firecracker: vsock, the host connects through Firecracker's unix socket ("CONNECT 1024").
    socket(my $srv, 40, SOCK_STREAM, 0) or do { say_console("no channel to the host: $!"); exit 1; };
    # struct sockaddr_vm { sa_family_t; unsigned short reserved; unsigned int port; unsigned int cid; char zero[4]; }
    bind($srv, pack("S S L L x4", 40, 0, $VSOCK_PORT, 0xFFFFFFFF)) or do { say_console("vsock bind: $!"); exit 1; };
    listen($srv, 1) or exit 1;
    say_console("listening on vsock port $VSOCK_PORT");
    while (1) {
        accept(my $c, $srv) or next;
        serve($c);
        close $c;
    }
}

# Run when executed; `require`d by the host's tests, which call handle() on the protocol alone.
main() unless caller;
1;
