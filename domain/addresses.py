"""Which addresses the server may connect to on a user's behalf (webhooks): public unicast only.

Python's `is_global` alone is not enough: it calls NAT64 (64:ff9b::/96) and IPv4-compatible (::/96)
forms of 127.0.0.1 and 169.254.169.254 global, and 6to4 (2002::/16) addresses route to the IPv4
address they embed. An IPv6 address that embeds an IPv4 address (IPv4-mapped, IPv4-compatible,
NAT64, 6to4) is judged by that IPv4 address too; every range of the IANA special-purpose registries
is refused, globally reachable or not (no webhook receiver lives in an anycast relay or a test net).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

IPAddress = IPv4Address | IPv6Address

_SPECIAL: tuple[tuple[IPv4Network | IPv6Network, str], ...] = tuple((ip_network(net), name) for net, name in (
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared address space (carrier-grade NAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.31.196.0/24", "AS112"),
    ("192.52.193.0/24", "AMT"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("192.175.48.0/24", "AS112"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/96", "IPv4-compatible (deprecated) or unspecified"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("2001::/23", "IETF protocol assignments (Teredo, benchmarking, ORCHID, ...)"),
    ("2001:db8::/32", "documentation"),
    ("2620:4f:8000::/48", "AS112"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "segment routing"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
))
_NAT64 = IPv6Network("64:ff9b::/96")


def embedded_ipv4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 address routes to or stands for (IPv4-mapped, IPv4-compatible,
    NAT64, 6to4), or None."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or address in IPv6Network("::/96"):
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal(address: IPAddress) -> str | None:
    """Why the server must not connect to `address` for a user, or None when it is public unicast."""
    if isinstance(address, IPv6Address):
        if address.scope_id:
            return "an IPv6 address with a zone (link-local)"
        inner = embedded_ipv4(address)
        if inner is not None and (why := refusal(inner)) is not None:
            return f"it embeds the IPv4 address {inner}, {why}"
    for network, name in _SPECIAL:
        if address.version == network.version and address in network:
            return f"{network} is {name}"
    if not address.is_global:
        return "not globally reachable"
    return None

