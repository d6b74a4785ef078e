"""A minimal nf_tables client over netlink: is a table there, a chain (and on which hook), how many rules a
chain holds, where an element of a verdict map jumps; and one kind of change, deletions (of map elements,
chains, the table) sent as one batch, which is how a session's rules leave (firewall.remove).

Why not `nft`: the session supervisor asks every second or two whether a session's rules are intact
(watch.py), and `nft -j list table` costs a process and a full listing of every session's rules (about 55 ms
with 50 sessions). Asking the kernel only about the session's chains and map elements costs a few small
netlink round trips in-process (about a millisecond in all, however many sessions there are). Rules are
written in nft's language (firewall.py, applied through libnftables); what is deleted needs no language, so
it goes here as raw messages. All in the calling thread's network namespace. Layouts and numbers are those
of <linux/netfilter/nf_tables.h>, <linux/netfilter/nfnetlink.h> and <linux/netlink.h>.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from dispo.errors import NetworkError, PermissionProblem
from dispo.infra.closer import close_behind

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFPROTO_INET = 1

NFT_MSG_GETTABLE, NFT_MSG_GETCHAIN, NFT_MSG_GETRULE, NFT_MSG_GETSET, NFT_MSG_GETSETELEM = 1, 4, 7, 10, 13
NFT_MSG_DELTABLE, NFT_MSG_DELCHAIN, NFT_MSG_DELSETELEM, NFT_MSG_GETGEN = 2, 5, 14, 16
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NLM_F_ACK = 0x4

NLM_F_REQUEST, NLM_F_DUMP, NLM_F_DUMP_INTR = 0x1, 0x300, 0x10
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_TYPE_MASK = 0x3FFF

NFTA_TABLE_NAME = 1
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK = 1, 3, 4
NFTA_HOOK_HOOKNUM = 1
NFTA_RULE_TABLE, NFTA_RULE_CHAIN = 1, 2
NFTA_SET_TABLE, NFTA_SET_NAME = 1, 2
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA = 1, 2
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
NFT_JUMP, NFT_GOTO = -3, -4

HOOKS = {0: "prerouting", 1: "input", 2: "forward", 3: "output", 4: "postrouting"}
IFNAMSIZ = 16  # the key length of an `ifname` set or map

HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id (big-endian, 0 here)
ATTR = struct.Struct("=HH")  # nlattr: len, type
_RETRIES = 5  # a dump interrupted by a concurrent ruleset change is asked again


def align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    raw = ATTR.pack(ATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (align(len(raw)) - len(raw))


def str_attr(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def split(data: bytes, what: str) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, body) of each netlink message in one datagram from `what` (the kernel: bounded by the
    datagram, a message's length is checked before its body is taken)."""
    off = 0
    while off + HDR.size <= len(data):
        length, kind, flags, seq, _pid = HDR.unpack_from(data, off)
        if length < HDR.size:
            raise NetworkError(f"malformed netlink answer from {what}")
        yield kind, flags, seq, data[off + HDR.size:off + length]
        off += align(length)


def attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each netlink attribute in data."""
    off = 0
    while off + ATTR.size <= len(data):
        length, kind = ATTR.unpack_from(data, off)
        if length < ATTR.size:
            break
        yield kind & NLA_TYPE_MASK, data[off + ATTR.size:off + length]
        off += align(length)


def _cstr(payload: bytes) -> str:
    return payload.split(b"\0", 1)[0].decode(errors="replace")


@dataclass(frozen=True)
class Chain:
    name: str
    hook: str  # "" for a regular chain


class NftReader:
    """One netlink socket to nf_tables in this thread's network namespace. Use as a context manager."""

    def __init__(self, family: int = NFPROTO_INET, *, close_behind: bool = False) -> None:
        """`close_behind`: close the socket on the closer thread (infra/closer.py): closing a netfilter socket
        waits for the kernel to free what nf_tables transactions deleted, even ones of other sockets."""
        self.family = family
        self._seq = 0
        self._close_behind = close_behind
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        except PermissionError:
            raise PermissionProblem("cannot open a netfilter netlink socket") from None
        self._sock.settimeout(10)  # the kernel always answers; a stuck socket must not hang a supervisor
        self._sock.bind((0, 0))

    def __enter__(self) -> NftReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._close_behind:
            close_behind(self._sock.close)
        else:
            self._sock.close()

    # -- requests -----------------------------------------------------------------------------------------------
    def _request(self, msg: int, flags: int, payload: bytes) -> list[bytes]:
        """Send one request; the payloads (after nfgenmsg) of the answer's messages. Raises OSError(errno)."""
        for _ in range(_RETRIES):
            self._seq += 1
            body = _NFGEN.pack(self.family, 0, 0) + payload
            kind = (NFNL_SUBSYS_NFTABLES << 8) | msg
            self._sock.send(HDR.pack(HDR.size + len(body), kind, NLM_F_REQUEST | flags, self._seq, 0) + body)
            out, interrupted = self._receive(dump=bool(flags & NLM_F_DUMP))
            if not interrupted:
                return out
        raise NetworkError("the nftables ruleset kept changing while dispo read it")

    def _receive(self, *, dump: bool) -> tuple[list[bytes], bool]:
        out: list[bytes] = []
        interrupted = False
        while True:
            data = self._sock.recv(1 << 17)
            for kind, flags, seq, body in split(data, "nf_tables"):
                if seq != self._seq:
                    continue  # an answer to an earlier request that was abandoned
                if flags & NLM_F_DUMP_INTR:
                    interrupted = True
                if kind == NLMSG_ERROR:
                    code = struct.unpack_from("=i", body)[0]
                    if code:
                        raise OSError(-code, os.strerror(-code))
                    return out, interrupted
                if kind == NLMSG_DONE:
                    return out, interrupted
                out.append(body[_NFGEN.size:])
                if not dump:
                    return out, interrupted

    # -- questions ----------------------------------------------------------------------------------------------
    def table_exists(self, table: str) -> bool:
        try:
            self._request(NFT_MSG_GETTABLE, 0, str_attr(NFTA_TABLE_NAME, table))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def chain(self, table: str, name: str) -> Chain | None:
        """The chain, or None when it (or the table) does not exist."""
        try:
            answer = self._request(NFT_MSG_GETCHAIN, 0,
                                   str_attr(NFTA_CHAIN_TABLE, table) + str_attr(NFTA_CHAIN_NAME, name))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        hook = ""
        for kind, payload in attrs(answer[0] if answer else b""):
            if kind == NFTA_CHAIN_HOOK:
                for k, p in attrs(payload):
                    if k == NFTA_HOOK_HOOKNUM:
                        hook = HOOKS.get(struct.unpack("!I", p[:4])[0], "?")
        return Chain(name, hook)

    # -- changes ------------------------------------------------------------------------------------------------
    def commit(self, messages: list[tuple[int, bytes]]) -> None:
        """Send (message type, attributes) as one nf_tables batch: all of it takes effect or none of it.
        Raises OSError(errno) of the first message the kernel refused (the batch is then undone)."""
        seqs = []
        out = [self._batch_marker(NFNL_MSG_BATCH_BEGIN)]
        for msg, payload in messages:
            self._seq += 1
            seqs.append(self._seq)
            body = _NFGEN.pack(self.family, 0, 0) + payload
            kind = (NFNL_SUBSYS_NFTABLES << 8) | msg
            out.append(HDR.pack(HDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, self._seq, 0) + body)
        out.append(self._batch_marker(NFNL_MSG_BATCH_END))
        self._sock.send(b"".join(out))
        # The kernel answers each message of the batch (an ack or its error); a GETGEN request sent after it
        # is answered after all of those, so reading up to its answer reads exactly the batch's answers.
        error: OSError | None = None
        wanted = set(seqs)
        self._seq += 1
        body = _NFGEN.pack(socket.AF_UNSPEC, 0, 0)
        self._sock.send(HDR.pack(HDR.size + len(body), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN,
                                  NLM_F_REQUEST, self._seq, 0) + body)
        done = False
        while not done:
            data = self._sock.recv(1 << 17)
            for kind, _flags, seq, msg_body in split(data, "nf_tables"):
                if seq == self._seq:
                    done = True
                elif seq in wanted and kind == NLMSG_ERROR:
                    code = struct.unpack_from("=i", msg_body)[0]
                    if code and error is None:
                        error = OSError(-code, os.strerror(-code))
        if error is not None:
            raise error

    def _batch_marker(self, kind: int) -> bytes:
        self._seq += 1
        body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(NFNL_SUBSYS_NFTABLES))
        return HDR.pack(HDR.size + len(body), kind, NLM_F_REQUEST, self._seq, 0) + body

    def chain_names(self, table: str) -> set[str] | None:
        """Names of the table's chains (one dump; names only), or None when the table does not exist."""
        if not self.table_exists(table):
            return None
        try:
            answer = self._request(NFT_MSG_GETCHAIN, NLM_F_DUMP, str_attr(NFTA_CHAIN_TABLE, table))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        names = set()
        for message in answer:
            chain_table, name = "", ""
            for kind, payload in attrs(message):  # the kernel puts table and name first: stop there
                if kind == NFTA_CHAIN_TABLE:
                    chain_table = _cstr(payload)
                elif kind == NFTA_CHAIN_NAME:
                    name = _cstr(payload)
                if chain_table and name:
                    break
            if name and chain_table in ("", table):  # an older kernel dumps every table's chains
                names.add(name)
        return names

    def rule_count(self, table: str, chain: str) -> int:
        """Number of rules in the chain (0 when it does not exist)."""
        try:
            answer = self._request(NFT_MSG_GETRULE, NLM_F_DUMP,
                                   str_attr(NFTA_RULE_TABLE, table) + str_attr(NFTA_RULE_CHAIN, chain))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return 0
            raise
        return len(answer)

    def map_exists(self, table: str, name: str) -> bool:
        try:
            self._request(NFT_MSG_GETSET, 0, str_attr(NFTA_SET_TABLE, table) + str_attr(NFTA_SET_NAME, name))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def map_jump(self, table: str, name: str, ifname: str) -> str | None:
        """Where the element `ifname` of an ifname-keyed verdict map jumps or goes to ("" for another verdict),
        or None when there is no such element (or map). One lookup, however big the map."""
        key = ifname.encode()[:IFNAMSIZ].ljust(IFNAMSIZ, b"\0")
        element = attr(NFTA_LIST_ELEM, attr(NFTA_SET_ELEM_KEY, attr(NFTA_DATA_VALUE, key)))
        try:
            answer = self._request(NFT_MSG_GETSETELEM, 0,
                                   str_attr(NFTA_SET_ELEM_LIST_TABLE, table) + str_attr(NFTA_SET_ELEM_LIST_SET, name)
                                   + attr(NFTA_SET_ELEM_LIST_ELEMENTS, element))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        found = _elements(answer)
        return found.get(ifname)


def del_table(table: str) -> tuple[int, bytes]:
    return NFT_MSG_DELTABLE, str_attr(NFTA_TABLE_NAME, table)


def del_chain(table: str, chain: str) -> tuple[int, bytes]:
    return NFT_MSG_DELCHAIN, str_attr(NFTA_CHAIN_TABLE, table) + str_attr(NFTA_CHAIN_NAME, chain)


def del_map_element(table: str, name: str, ifname: str) -> tuple[int, bytes]:
    """Delete the element `ifname` of an ifname-keyed map."""
    key = ifname.encode()[:IFNAMSIZ].ljust(IFNAMSIZ, b"\0")
    element = attr(NFTA_LIST_ELEM, attr(NFTA_SET_ELEM_KEY, attr(NFTA_DATA_VALUE, key)))
    return NFT_MSG_DELSETELEM, (str_attr(NFTA_SET_ELEM_LIST_TABLE, table) + str_attr(NFTA_SET_ELEM_LIST_SET, name)
                                + attr(NFTA_SET_ELEM_LIST_ELEMENTS, element))


def _elements(messages: list[bytes]) -> dict[str, str]:
    out: dict[str, str] = {}
    for message in messages:
        for kind, elements in attrs(message):
            if kind != NFTA_SET_ELEM_LIST_ELEMENTS:
                continue
            for k, element in attrs(elements):
                if k == NFTA_LIST_ELEM:
                    key, target = _element(element)
                    if key is not None:
                        out[key] = target
    return out


def _element(data: bytes) -> tuple[str | None, str]:
    key: str | None = None
    target = ""
    for kind, payload in attrs(data):
        if kind == NFTA_SET_ELEM_KEY:
            key = next((_cstr(p) for k, p in attrs(payload) if k == NFTA_DATA_VALUE), None)
        elif kind == NFTA_SET_ELEM_DATA:
            for k, verdict in attrs(payload):
                if k != NFTA_DATA_VERDICT:
                    continue
                code, chain = 0, ""
                for vk, vp in attrs(verdict):
                    if vk == NFTA_VERDICT_CODE:
                        code = struct.unpack("!i", vp[:4])[0]
                    elif vk == NFTA_VERDICT_CHAIN:
                        chain = _cstr(vp)
                target = chain if code in (NFT_JUMP, NFT_GOTO) else ""
    return key, target
