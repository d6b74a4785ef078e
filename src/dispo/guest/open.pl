#!/usr/bin/perl
# dispo-open ARGV...: hand a command line (the browser and its URL) to the Chromium that already runs as this
# user, through its process-singleton socket, as a second `chromium URL` would, without starting a second
# browser process first (that alone takes seconds under emulation). Used by `dispo-app attach` in a clone of a
# template. Exit 0 when the browser acknowledged, 1 otherwise (the caller then runs the command itself).
#
# The message (Chromium's process_singleton_posix.cc): "START\0<cwd>\0<argv0>\0<arg1>...", the writing side
# shut down, then the browser answers "ACK".
use strict;
use warnings;
use Socket;

my $path = "$ENV{HOME}/.config/chromium/SingletonSocket";   # a link to the socket in the browser's temp dir
exit 1 unless @ARGV && -S $path;
socket(my $s, AF_UNIX, SOCK_STREAM, 0) or exit 1;
connect($s, pack_sockaddr_un($path)) or exit 1;
my $cwd = $ENV{HOME} // "/";
my $msg = join("\0", "START", $cwd, @ARGV);
defined(send($s, $msg, 0)) or exit 1;
shutdown($s, 1) or exit 1;
my $reply = "";
eval {
    local $SIG{ALRM} = sub { die "timeout\n" };
    alarm 20;
    while (length($reply) < 3) {
        my $n = sysread($s, my $chunk, 16);
        last unless $n;
        $reply .= $chunk;
    }
    alarm 0;
};
exit(substr($reply, 0, 3) eq "ACK" ? 0 : 1);
