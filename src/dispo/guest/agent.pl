#!/usr/bin/perl
# dispo-agent: the in-guest half of giving a restored clone its own identity (docs/templates.md).
#
# It listens on a host-only channel: the virtio-serial port named "dispo.agent" (QEMU), or vsock port
# 1024 (Firecracker). There is no network path to it. Perl because perl-base is in every Debian image
# (Essential) and can make the two ioctls the RNG reseed needs; nothing beyond perl-base is used.
#
# The protocol (docs/templates.md), version 2. Requests are ASCII lines of at most 131072 bytes, words
# separated by one space; each gets one reply line, "ok[ DATA]" or "err REASON". Every argument is checked
# against a strict pattern; anything else is answered with "err" and changes nothing.
#   hello 2 TOKEN                   -> ok dispo-agent 2 TOKEN (TOKEN: 8 to 32 hex digits; the host resends
#                                      until its latest token comes back, so no stale reply is mistaken).
#                                      Its answer is what makes a guest "ready": the agent answers nothing
#                                      before the init says the guest is set up (/run/dispo-ready).
#   clock SECONDS NANOSECONDS       the wall clock stepped to the host's (clock_settime, no process)
#   identity NAME MAC ADDR/PREFIX GATEWAY DNS SECONDS NANOSECONDS ENTROPY HOST-KEY USER-KEY
#                                   a restored clone's identity, all checked before any of it is applied,
#                                   then in this order: ENTROPY (hex, 32..512 bytes) mixed into the kernel's
#                                   pool, credited, and the CRNG reseeded (RNDADDENTROPY, RNDRESEEDCRNG); the
#                                   clock; hostname NAME ([a-z0-9-]{1,63}: /proc, /etc/hostname, /etc/hosts);
#                                   HOST-KEY (hex of an OpenSSH private key file; sshd re-executes on it);
#                                   USER-KEY (hex of the authorized_keys line of the session's user); the
#                                   network interface re-addressed over rtnetlink (DNS: a,b,c or -); no
#                                   process is started for any of it
#   run HEX                         the command HEX (hex of at most 65536 bytes) run as the session's user
#                                   by the user's shell (SHELL -c COMMAND, as sshd runs it, with sshd's
#                                   environment, in the home directory, in a new session). After "ok", the
#                                   channel carries frames both ways until the command is over:
#                                   a frame is TYPE (1 byte) LENGTH (2 bytes, big endian, at most 32768) DATA.
#                                     guest -> host: o DATA (stdout), e DATA (stderr), then exactly one
#                                                    x STATUS (0..255, or sN: killed by signal N), sent once
#                                                    the command exited and its stdout and stderr closed
#                                     host -> guest: i DATA (stdin), c (stdin closed), k (kill the command's
#                                                    process group), z (after x: the run is over; lines again)
use strict;
use warnings;
use Fcntl qw(O_WRONLY O_CREAT O_EXCL O_NOFOLLOW O_RDWR F_GETFL F_SETFL F_SETOWN O_NONBLOCK O_ASYNC);
use Socket;

$0 = "dispo-agent";
our $MAX_LINE = 131072;
our $MAX_COMMAND = 65536;
our $MAX_FRAME = 32768;
our $STDIN_HELD = 262144;   # stdin bytes held for a command that does not read them before the channel waits
our @AFTER_REPLY;           # what a request left to do once its reply is written (the sshd restart)
our $RUN_USER = "user";     # whom `run` runs as ("": the agent's own user, for the host's tests of the protocol)
my $PORT_NAME = "dispo.agent";
my $VSOCK_PORT = 1024;
my $USER_HOME = "/home/user";
my $USER_UID = 1000;
my $HOST_KEY = "/etc/ssh/ssh_host_ed25519_key";
my $USER_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/games";   # what Debian's sshd gives a session
$ENV{PATH} = "/usr/sbin:/usr/bin:/sbin:/bin";

# The system calls perl has no word for, by the machine this perl runs on (its ELF header's e_machine).
my %SYSCALLS = (62  => {clock_settime => 227, setsid => 112, setgroups => 116, setresuid => 117, setresgid => 119},
                183 => {clock_settime => 112, setsid => 157, setgroups => 159, setresuid => 147, setresgid => 149});
my $MACHINE;
sub sys_no {
    my ($name) = @_;
    unless (defined $MACHINE) {
        $MACHINE = 0;
        if (open(my $f, '<:raw', '/proc/self/exe')) {
            my $hdr = "";
            $MACHINE = unpack("v", substr($hdr, 18, 2)) if (sysread($f, $hdr, 20) // 0) == 20;
            close $f;
        }
    }
    return $SYSCALLS{$MACHINE} ? $SYSCALLS{$MACHINE}{$name} : undef;
}

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

sub write_all {
    my ($fh, $data) = @_;
    while (length $data) {
        my $n = syswrite($fh, $data);
        next if !defined $n && $!{EINTR};   # a signal (a command's SIGCHLD) came first: nothing was written
        return 0 unless defined $n && $n > 0;
        substr($data, 0, $n) = "";
    }
    return 1;
}

sub hex_bytes {
    my ($hex, $min, $max) = @_;
    return undef unless defined $hex && $hex =~ /\A(?:[0-9a-f]{2})+\z/;
    my $bytes = pack("H*", $hex);
    return undef if length($bytes) < $min || length($bytes) > $max;
    return $bytes;
}

# -- the identity -----------------------------------------------------------------------------------
my $OCTET = qr/(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])/;
my $IP = qr/$OCTET\.$OCTET\.$OCTET\.$OCTET/;

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

sub clock_ok { my ($sec, $nsec) = @_; return $sec =~ /\A[0-9]{1,12}\z/ && $nsec =~ /\A[0-9]{1,9}\z/; }

sub do_clock {
    my ($sec, $nsec) = @_;
    return "err bad clock" unless clock_ok($sec, $nsec);
    my $n = sys_no("clock_settime") // return "err no clock_settime on this machine";
    my $ts = pack("q q", $sec, $nsec);   # struct timespec
    return syscall($n, 0, $ts) == 0 ? "ok" : "err clock_settime: $!";   # CLOCK_REALTIME
}

sub do_hostname {
    my ($name) = @_;
    open(my $k, '>', '/proc/sys/kernel/hostname') or return "err cannot set the hostname";
    print $k $name or return "err cannot set the hostname";
    close $k or return "err cannot set the hostname";
    write_file("/etc/hostname", "$name\n", 0644);
    write_file("/etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\t$name\n::1\tlocalhost ip6-localhost ip6-loopback\n",
               0644);
    return "ok";
}

sub do_host_key {
    my ($key) = @_;
    write_file($HOST_KEY, $key, 0600) or return "err cannot write the host key";
    unlink "$HOST_KEY.pub";
    # sshd loads its host keys for every connection (it re-executes itself per connection); SIGHUP makes the
    # listener re-execute too, so nothing of the template's key stays in any sshd process. It is sent once the
    # reply is out: the re-execution takes a few hundred ms of an emulated vCPU, which the rest of the identity
    # and the reply need not wait for, and a connection made meanwhile already gets the new key from the file.
    if (open(my $p, '<', '/run/sshd.pid')) {
        my $pid = <$p>;
        close $p;
        if (defined $pid && $pid =~ /\A([0-9]+)\s*\z/) {
            my $listener = $1;
            kill(0, $listener) or return "err sshd is not running";
            push @AFTER_REPLY, sub { kill 'HUP', $listener; };
        }
    }
    return "ok";
}

sub do_user_key {
    my ($line) = @_;
    $line .= "\n" unless $line =~ /\n\z/;
    mkdir "$USER_HOME/.ssh", 0700;
    write_file("$USER_HOME/.ssh/authorized_keys", $line, 0600, $USER_UID) or return "err cannot write authorized_keys";
    return "ok";
}

# -- the network, over rtnetlink (no process: an `ip` costs a tenth of a second of an emulated vCPU) ------
my $NL_SEQ = 0;
my %ERRNO = (EBUSY => 16, ENOENT => 2, EADDRNOTAVAIL => 99);

sub nl_attr {
    my ($type, $data) = @_;
    my $len = 4 + length $data;
    return pack("S S", $len, $type) . $data . ("\0" x ((4 - $len % 4) % 4));
}

# The attributes of a message's tail, by type.
sub nl_attrs {
    my ($data) = @_;
    my %a;
    while (length($data) >= 4) {
        my ($len, $type) = unpack("S S", $data);
        last if $len < 4 || $len > length $data;
        $a{$type & 0x3fff} = substr($data, 4, $len - 4);
        substr($data, 0, ($len + 3) & ~3) = "";
    }
    return \%a;
}

# Sends one request (struct nlmsghdr, then BODY); the messages answering it, as [type, body], up to the ack or
# the dump's end. An error answer is [2, errno]; undef when the socket failed.
sub nl_talk {
    my ($s, $type, $flags, $body) = @_;
    my $seq = ++$NL_SEQ;
    defined(send($s, pack("L S S L L", 16 + length $body, $type, $flags | 1, $seq, 0) . $body, 0)) or return undef;
    my @got;
    while (1) {
        my $buf = "";
        unless (defined recv($s, $buf, 65536, 0)) { next if $!{EINTR}; return undef; }
        while (length($buf) >= 16) {
            my ($len, $t, $f, $sq) = unpack("L S S L", $buf);
            return undef if $len < 16 || $len > length $buf;
            my $m = substr($buf, 16, $len - 16);
            substr($buf, 0, ($len + 3) & ~3) = "";
            next unless $sq == $seq;
            return [@got, [2, -unpack("l", $m)]] if $t == 2;   # NLMSG_ERROR (0: the ack)
            return \@got if $t == 3;                           # NLMSG_DONE
            push @got, [$t, $m];
        }
    }
}

# One change, acknowledged: 0, or the errno it failed with (-1: the socket failed).
sub nl_do {
    my ($s, $type, $flags, $body) = @_;
    my $got = nl_talk($s, $type, $flags | 4, $body) // return -1;   # NLM_F_ACK
    return @$got && $got->[-1][0] == 2 ? $got->[-1][1] : 0;
}

sub nl_why { my ($what, $e) = @_; local $! = $e; return $e < 0 ? "$what: netlink failed" : "$what: $!"; }

# RTM_NEWLINK on the interface: its MAC (undef: unchanged) and up (1) or down (0).
sub nl_link {
    my ($s, $index, $hw, $up) = @_;
    return nl_do($s, 16, 0, pack("C x S l L L", 0, 0, $index, $up ? 1 : 0, 1) . (defined $hw ? nl_attr(1, $hw) : ""));
}

# The interface's IPv4 addresses, neighbours and routes made anew, as `ip addr flush; ip link set address;
# ip neigh flush; ip addr add; ip route replace default` would (IPv6 is off on it: the init's). "" or why not.
sub net_apply {
    my ($s, $index, $hw, $ip, $prefix, $gw) = @_;
    my $inet = sub { return pack("C4", split(/\./, $_[0])); };
    my $addrs = nl_talk($s, 22, 0x300, pack("C C C C L", 2, 0, 0, 0, 0)) // return "listing addresses failed";
    for my $m (@$addrs) {   # RTM_GETADDR's dump: the template's address(es) deleted (RTM_DELADDR)
        next unless $m->[0] == 20 && length($m->[1]) >= 8;
        my ($fam, $plen, undef, $scope, $idx) = unpack("C C C C L", $m->[1]);
        next unless $fam == 2 && $idx == $index;
        my $a = nl_attrs(substr($m->[1], 8));
        my $body = pack("C C C C L", 2, $plen, 0, $scope, $index);
        $body .= nl_attr(2, $a->{2}) if defined $a->{2};   # IFA_LOCAL
        $body .= nl_attr(1, $a->{1}) if defined $a->{1};   # IFA_ADDRESS
        my $e = nl_do($s, 21, 0, $body);
        return nl_why("deleting an address", $e) if $e && $e != $ERRNO{EADDRNOTAVAIL};   # gone with its primary
    }
    # The MAC while the link stays up (virtio-net changes it live); a device that refuses (EBUSY) goes down for it.
    my $e = nl_link($s, $index, $hw, 1);
    if ($e == $ERRNO{EBUSY}) {
        $e = nl_link($s, $index, undef, 0) || nl_link($s, $index, $hw, 1);
    }
    return nl_why("setting the MAC", $e) if $e;
    my $neigh = nl_talk($s, 30, 0x300, pack("C x3 l S C C", 2, 0, 0, 0, 0)) // return "listing neighbours failed";
    for my $m (@$neigh) {   # RTM_GETNEIGH's dump: what the template had learnt deleted, as `ip neigh flush`
        next unless $m->[0] == 28 && length($m->[1]) >= 12;
        my ($fam, $idx, $state) = unpack("C x3 l S", $m->[1]);
        next unless $fam == 2 && $idx == $index && !($state & 0xc0);   # not NUD_NOARP or NUD_PERMANENT
        my $dst = nl_attrs(substr($m->[1], 12))->{1} // next;       # NDA_DST
        $e = nl_do($s, 29, 0, pack("C x3 l S C C", 2, $index, 0, 0, 0) . nl_attr(1, $dst));
        return nl_why("flushing a neighbour", $e) if $e && $e != $ERRNO{ENOENT};
    }
    # RTM_NEWADDR (create, exclusive), then RTM_NEWROUTE (create, replace): main table, boot protocol, unicast.
    $e = nl_do($s, 20, 0x600, pack("C C C C L", 2, $prefix, 0, 0, $index) . nl_attr(2, $inet->($ip))
               . nl_attr(1, $inet->($ip)));
    return nl_why("adding the address", $e) if $e;
    $e = nl_do($s, 24, 0x500, pack("C C C C C C C C L", 2, 0, 0, 0, 254, 3, 0, 1, 0) . nl_attr(5, $inet->($gw))
               . nl_attr(4, pack("L", $index)));
    return nl_why("adding the default route", $e) if $e;
    return "";
}

sub do_net {
    my ($mac, $addr, $gw, $dns) = @_;
    my $dev;
    for my $n (sort glob "/sys/class/net/*") {
        my ($name) = $n =~ m{([^/]+)\z};
        next if $name eq "lo";
        $dev = $name;
        last;
    }
    return "err no network interface" unless defined $dev && $dev =~ /\A[A-Za-z0-9_.-]{1,15}\z/;
    my $index;
    if (open(my $f, '<', "/sys/class/net/$dev/ifindex")) { $index = <$f>; close $f; }
    return "err no index for $dev" unless defined $index && $index =~ /\A([0-9]{1,9})\s*\z/;
    $index = $1;
    my ($ip, $prefix) = split(m{/}, $addr);
    socket(my $s, 16, 3, 0) or return "err cannot open netlink: $!";   # AF_NETLINK, SOCK_RAW, NETLINK_ROUTE
    my $why = net_apply($s, $index, pack("H*", join("", split(/:/, $mac))), $ip, $prefix, $gw);
    close $s;
    return "err re-addressing $dev failed: $why" if $why ne "";
    my $conf = $dns eq "-" ? "" : join("", map { "nameserver $_\n" } split(/,/, $dns));
    write_file("/etc/resolv.conf", $conf, 0644) or return "err cannot write resolv.conf";
    return "ok";
}

# identity NAME MAC ADDR/PREFIX GATEWAY DNS SECONDS NANOSECONDS ENTROPY HOST-KEY USER-KEY: every word checked
# first, then applied in the order that matters: the RNG first (everything after it, the sshd restart included,
# draws from reseeded randomness), the network last (the guest has no working address before, so nothing of
# the user's reaches it under the template's).
sub do_identity {
    my ($name, $mac, $addr, $gw, $dns, $sec, $nsec, $ent, $hkey, $ukey) = @_;
    return "err bad hostname" unless $name =~ /\A[a-z0-9][a-z0-9-]{0,62}\z/;
    return "err bad mac" unless $mac =~ /\A[0-9a-f]{2}(?::[0-9a-f]{2}){5}\z/;
    return "err bad address" unless $addr =~ /\A$IP\/(?:[0-9]|[12][0-9]|3[0-2])\z/;
    return "err bad gateway" unless $gw =~ /\A$IP\z/;
    return "err bad dns" unless $dns eq "-" || $dns =~ /\A$IP(?:,$IP){0,3}\z/;
    return "err bad clock" unless clock_ok($sec, $nsec);
    my $entropy = hex_bytes($ent, 32, 512) // return "err entropy must be 32 to 512 bytes in hex";
    my $host_key = hex_bytes($hkey, 64, 4096) // return "err host-key must be hex";
    return "err bad host key"
        unless $host_key =~ /\A-----BEGIN OPENSSH PRIVATE KEY-----\n[A-Za-z0-9+\/=\n]+-----END OPENSSH PRIVATE KEY-----\n?\z/;
    my $user_key = hex_bytes($ukey, 16, 512) // return "err user-key must be hex";
    return "err bad user key" unless $user_key =~ /\Assh-ed25519 [A-Za-z0-9+\/=]{40,200}(?: [\x21-\x7e]{1,100})?\n?\z/;
    for my $r (do_entropy($entropy), do_clock($sec, $nsec), do_hostname($name), do_host_key($host_key),
               do_user_key($user_key), do_net($mac, $addr, $gw, $dns)) {
        return $r unless $r eq "ok";
    }
    return "ok";
}

# -- run: a command as the session's user, its stdio framed over the channel -------------------------
sub frame { my ($type, $data) = @_; return pack("a n", $type, length $data) . $data; }

# The child: a new session, the user's credentials (all three ids, and the user's groups), sshd's environment,
# the home directory, then the user's shell with -c, as sshd runs a command. Never returns.
sub exec_command {
    my ($cmd, $in, $out, $err) = @_;
    open(STDIN, '<&', $in) && open(STDOUT, '>&', $out) && open(STDERR, '>&', $err) or exit 127;
    $SIG{PIPE} = 'DEFAULT';   # the agent ignores it, and an ignored signal stays ignored across exec
    my $setsid = sys_no("setsid");
    syscall($setsid, 0) if defined $setsid;
    my ($name, $uid, $gid, $dir, $shell);
    if ($RUN_USER eq "") {
        ($name, $uid, $gid, $dir, $shell) = ((getpwuid($<))[0] // "nobody", $<, (split / /, $()[0], ".", "/bin/sh");
    } else {
        my @pw = getpwnam($RUN_USER) or do { print STDERR "dispo-agent: no user $RUN_USER\n"; exit 127; };
        ($name, $uid, $gid, $dir, $shell) = @pw[0, 2, 3, 7, 8];
        my @groups = ($gid);
        setgrent();
        while (my @g = getgrent()) { push @groups, $g[2] if grep { $_ eq $name } split / /, $g[3]; }
        endgrent();
        my ($sg, $sr, $su) = map { sys_no($_) } qw(setgroups setresgid setresuid);
        unless (defined $su && syscall($sg, scalar @groups, pack("L*", @groups)) == 0
                && syscall($sr, $gid, $gid, $gid) == 0 && syscall($su, $uid, $uid, $uid) == 0
                && $< == $uid && $> == $uid) {
            print STDERR "dispo-agent: cannot become $name: $!\n";
            exit 127;
        }
    }
    $shell = "/bin/sh" unless defined $shell && length $shell;
    chdir $dir or chdir "/";
    %ENV = (USER => $name, LOGNAME => $name, HOME => $dir, PATH => $USER_PATH, MAIL => "/var/mail/$name",
            SHELL => $shell);
    my ($argv0) = $shell =~ m{([^/]+)\z};
    { no warnings 'exec'; exec { $shell } $argv0, "-c", $cmd; }
    print STDERR "dispo-agent: cannot run $shell: $!\n";
    exit 127;
}

sub nonblocking { my ($fh) = @_; my $f = fcntl($fh, F_GETFL, 0); fcntl($fh, F_SETFL, $f | O_NONBLOCK) if defined $f; }

# Runs the command to its end; the channel's bytes after the host's "z" (undef: the channel is gone).
sub do_run {
    my ($fh, $cmd, $buf) = @_;
    my ($in_r, $in_w, $out_r, $out_w, $err_r, $err_w);
    unless (pipe($in_r, $in_w) && pipe($out_r, $out_w) && pipe($err_r, $err_w)) {
        return write_all($fh, "err cannot make pipes: $!\n") ? $buf : undef;
    }
    # The command's end wakes the wait below (select returns EINTR) instead of its next poll.
    local $SIG{CHLD} = sub { };
    my $pid = fork();
    unless (defined $pid) { return write_all($fh, "err cannot fork: $!\n") ? $buf : undef; }
    exec_command($cmd, $in_r, $out_w, $err_w) if $pid == 0;
    close $in_r; close $out_w; close $err_w;
    nonblocking($in_w);
    my %open = (o => $out_r, e => $err_r);
    my ($stdin, $stdin_open, $stdin_ends, $status) = ("", 1, 0, undef);
    my $gone = sub { kill 'KILL', -$pid; kill 'KILL', $pid; waitpid($pid, 0); return undef; };
    write_all($fh, "ok\n") or return $gone->();
    while (1) {
        # What the host sent: whole frames only; anything but the frames it may send ends the run.
        while (length($buf) >= 3) {
            my ($type, $len) = unpack("a n", $buf);
            return $gone->() if $len > $MAX_FRAME;
            last if length($buf) < 3 + $len;
            my $data = substr($buf, 3, $len);
            substr($buf, 0, 3 + $len) = "";
            # stdin may still come after "x": the host had not read it yet.
            if ($type eq "i") { $stdin .= $data if $stdin_open && !$stdin_ends; }
            elsif ($type eq "c" && $len == 0) { $stdin_ends = 1; }
            elsif ($type eq "k" && $len == 0) { kill 'KILL', -$pid unless defined $status; }
            elsif ($type eq "z" && $len == 0 && defined $status) { return $buf; }
            else { return $gone->(); }
        }
        if ($stdin_open && $stdin_ends && $stdin eq "") { close $in_w; $stdin_open = 0; }
        if (!%open && !defined $status) {
            # stdout and stderr closed: the exit status once the command is gone (the channel still heard).
            if (waitpid($pid, 1) == $pid) {   # WNOHANG
                $status = ($? & 127) ? "s" . ($? & 127) : ($? >> 8);
                write_all($fh, frame("x", $status)) or return $gone->();
                close $in_w if $stdin_open;
                $stdin_open = 0;
                next;
            }
        }
        my ($rin, $win) = ("", "");
        vec($rin, fileno($fh), 1) = 1 if length($stdin) < $STDIN_HELD;
        vec($rin, fileno($_), 1) = 1 for values %open;
        vec($win, fileno($in_w), 1) = 1 if $stdin_open && $stdin ne "";
        my $timeout = (!%open && !defined $status) ? 0.05 : undef;
        my $n = select(my $rout = $rin, my $wout = $win, undef, $timeout);
        next if $n <= 0;
        for my $t (sort keys %open) {
            my $h = $open{$t};
            next unless vec($rout, fileno($h), 1);
            my $got = sysread($h, my $data, $MAX_FRAME);
            next if !defined $got && $!{EINTR};
            if (!$got) { close $h; delete $open{$t}; next; }
            write_all($fh, frame($t, $data)) or return $gone->();
        }
        if ($stdin_open && $stdin ne "" && vec($wout, fileno($in_w), 1)) {
            my $put = syswrite($in_w, $stdin);
            if (defined $put) { substr($stdin, 0, $put) = ""; }
            elsif (!$!{EAGAIN} && !$!{EINTR}) { close $in_w; $stdin_open = 0; $stdin = ""; }   # it closed its stdin
        }
        if (vec($rout, fileno($fh), 1)) {
            my $got = sysread($fh, my $chunk, 65536);
            next if !defined $got && $!{EINTR};
            return $gone->() unless $got;   # the host went away: the command goes too
            $buf .= $chunk;
        }
    }
}

sub handle {
    my ($line) = @_;
    my @w = split(/ /, $line, -1);
    my $cmd = shift(@w) // "";
    if ($cmd eq "hello" && @w == 2 && $w[0] eq "2" && $w[1] =~ /\A[0-9a-f]{8,32}\z/) { return "ok dispo-agent 2 $w[1]"; }
    if ($cmd eq "clock" && @w == 2) { return do_clock(@w); }
    if ($cmd eq "identity" && @w == 10) { return do_identity(@w); }
    return "err unknown request";
}

# The command of a "run" line, or undef and why not.
sub run_command {
    my ($line) = @_;
    my ($hex) = $line =~ /\Arun ([0-9a-f]+)\z/ or return (undef, "err bad run");
    my $cmd = hex_bytes($hex, 1, $MAX_COMMAND);
    return (undef, "err the command must be 1 to $MAX_COMMAND bytes in hex") unless defined $cmd;
    return (undef, "err the command has a NUL byte") if index($cmd, "\0") >= 0;
    return ($cmd, "");
}

# -- the channel ------------------------------------------------------------------------------------
# Serves requests until the host goes away; whether it read anything.
sub serve {
    my ($fh) = @_;
    my $buf = "";
    my $heard = 0;
    while (1) {
        while ((my $i = index($buf, "\n")) >= 0) {
            my $line = substr($buf, 0, $i);
            substr($buf, 0, $i + 1) = "";
            if ($line =~ /\Arun /) {
                my ($command, $why) = run_command($line);
                if (defined $command) {
                    $buf = do_run($fh, $command, $buf);
                    return 1 unless defined $buf;
                    next;
                }
                write_all($fh, "$why\n") or return 1;
                next;
            }
            my $reply = ($line =~ /\A[\x20-\x7e]*\z/) ? handle($line) : "err not printable ascii";
            my $sent = write_all($fh, "$reply\n");
            $_->() for splice(@AFTER_REPLY);
            $sent or return 1;
        }
        if (length($buf) > $MAX_LINE) { write_all($fh, "err line too long\n"); return 1; }
        my $n = sysread($fh, my $chunk, 65536);
        return $heard unless $n;    # an error or the host side closed: the caller reopens
        $heard = 1;
        $buf .= $chunk;
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
    $SIG{PIPE} = 'IGNORE';  # a command's pipe or a host gone must not take the agent with it
    # The channel is whatever device the VMM gave: a virtio console (QEMU) or a vsock (Firecracker). Decided
    # by the hardware, not by what shows up first (the vsock module makes /dev/vsock without any device).
    # The initrd loads virtio_console (the image recipe's initrd_modules): its port is there when the agent
    # starts. Loading it from here, off the root disk while the init sets the guest up, took 1 to 3 s of a cold
    # boot under TCG, so a modprobe is only the fallback (an image made without it), and only once: the port
    # shows up in sysfs by itself once the driver is bound.
    my ($port, $loaded);
    for (1 .. 200) {
        if (virtio_has(3)) {
            last if defined($port = find_port());
            $loaded++ or system("modprobe", "-q", "virtio_console");
        } elsif (virtio_has(19)) {
            $loaded++ or system("modprobe", "-q", "vmw_vsock_virtio_transport");
            last if -e "/dev/vsock";
        }
        select(undef, undef, undef, 0.05);
    }
    # The init says when the guest is set up (its network, its settings): only then may the host hear "ready".
    select(undef, undef, undef, 0.02) until -e "/run/dispo-ready";
    if (defined $port) {
        say_console("listening on $port");
        my ($idle, $io) = (0, 0);
        local $SIG{IO} = sub { $io = 1; };
        while (1) {
            my $fh;
            unless (sysopen($fh, $port, O_RDWR)) { select(undef, undef, undef, 0.1); next; }
            my $fl = fcntl($fh, F_GETFL, 0) // 0;
            fcntl($fh, F_SETOWN, $$);
            while (1) {
                my $heard = serve($fh);
                # The host side is not connected: virtio-serial reads return at once, so wait, briefly after a
                # conversation (the host connects again for the next step) and longer when idle. The driver
                # signals the port's owner (SIGIO) when the host connects or sends, which ends the wait at once
                # (a restored clone's first hello); the timer is for a signal that came before the wait began.
                # The port stays open: closing it would drop what the host sent meanwhile. Signalled only while
                # waiting, so no signal interrupts a conversation.
                $io = 0;
                fcntl($fh, F_SETFL, $fl | O_ASYNC);
                $idle = $heard ? 0 : $idle + 1;
                select(undef, undef, undef, $idle < 100 ? 0.01 : 0.1) unless $io;
                fcntl($fh, F_SETFL, $fl);
            }
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
