//! Keeps webhooks away from the server's own network: loopback, private, link-local, CGNAT, multicast and cloud
//! metadata addresses are refused, both when a request names the URL and on the address actually connected to.
//! IPv6 addresses that embed an IPv4 address (mapped, compatible, translated, NAT64, 6to4, Teredo) are judged by
//! that IPv4 address: a public one inside stays allowed, an internal one is refused like the IPv4 address itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use url::{Host, Url};

/// Whether a webhook may not connect to this address. An IPv6 address that carries an IPv4 address is judged by
/// the IPv4 address it leads to, so that `[::127.0.0.1]` or `[2002:7f00:1::]` cannot reach loopback.
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => match inside(v6) {
            Inside::Nothing => forbidden_v6(v6),
            Inside::V4(v4) => forbidden_v4(v4),
            Inside::Teredo { server, client } => forbidden_v4(server) || forbidden_v4(client),
            Inside::Unknowable => true,
        },
    }
}

/// The IPv4 address an IPv6 address leads to, for the forms that embed one.
#[derive(Debug, PartialEq, Eq)]
enum Inside {
    /// A plain IPv6 address.
    Nothing,
    /// IPv4-mapped `::ffff:0:0/96`, IPv4-compatible `::/96`, IPv4-translated `::ffff:0:0:0/96`, NAT64
    /// `64:ff9b::/96` (the last 32 bits), 6to4 `2002::/16` (bits 16..48).
    V4(Ipv4Addr),
    /// Teredo `2001::/32`: the server in bits 32..64, the client (the host finally reached) in the last 32
    /// bits with every bit flipped.
    Teredo { server: Ipv4Addr, client: Ipv4Addr },
    /// The local-use NAT64 prefix `64:ff9b:1::/48` (RFC 8215): where its IPv4 address sits depends on the prefix
    /// length the local operator chose, and it only exists inside a local network anyway.
    Unknowable,
}

fn inside(v6: Ipv6Addr) -> Inside {
    let s = v6.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match s {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] | [0, 0, 0, 0, 0, 0, hi, lo] | [0, 0, 0, 0, 0xffff, 0, hi, lo] => {
            Inside::V4(v4(hi, lo))
        }
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Inside::V4(v4(hi, lo)),
        [0x64, 0xff9b, 1, ..] => Inside::Unknowable,
        [0x2002, hi, lo, ..] => Inside::V4(v4(hi, lo)),
        [0x2001, 0, server_hi, server_lo, _, _, client_hi, client_lo] => {
            Inside::Teredo { server: v4(server_hi, server_lo), client: v4(!client_hi, !client_lo) }
        }
        _ => Inside::Nothing,
    }
}

fn forbidden_v6(v6: Ipv6Addr) -> bool {
    let first = v6.segments()[0];
    v6.is_loopback()
        || v6.is_unspecified()
        || v6.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local, includes fd00:ec2::254 (cloud metadata)
        || (first & 0xffc0) == 0xfe80 // link-local
}

fn forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254/16, includes 169.254.169.254 (cloud metadata)
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_unspecified()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10, includes 100.100.100.200 (metadata)
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // 192.0.0.0/24, IETF protocol assignments
        || a >= 240 // reserved
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("`webhook_url` must use http or https")]
    Scheme,
    #[error("`webhook_url` has no host")]
    NoHost,
    #[error("`webhook_url`'s host {0} could not be resolved")]
    Unresolvable(String),
    #[error(
        "`webhook_url` points to {0}, a loopback, private, link-local or metadata address; this server does not send webhooks there"
    )]
    Forbidden(IpAddr),
}

/// Checks a URL at creation: scheme, and every address its host resolves to.
pub async fn check_target(url: &Url) -> Result<(), TargetError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(TargetError::Scheme);
    }
    let port = url.port_or_known_default().unwrap_or(80);
    let addrs: Vec<SocketAddr> = match url.host().ok_or(TargetError::NoHost)? {
        Host::Ipv4(ip) => vec![SocketAddr::new(ip.into(), port)],
        Host::Ipv6(ip) => vec![SocketAddr::new(ip.into(), port)],
        Host::Domain(name) => tokio::net::lookup_host((name, port))
            .await
            .map_err(|_| TargetError::Unresolvable(name.to_owned()))?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(TargetError::Unresolvable(url.host_str().unwrap_or_default().to_owned()));
    }
    match addrs.iter().find(|a| is_forbidden(a.ip())) {
        Some(addr) => Err(TargetError::Forbidden(addr.ip())),
        None => Ok(()),
    }
}

/// The resolver of the delivery client: it drops forbidden addresses from every answer, so the address that is
/// connected to is the address that was checked (a DNS answer that changes after the creation check cannot get
/// through). IP literals never reach a resolver; the deliverer checks those itself.
pub struct GuardedResolver;

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let allowed: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.filter(|a| !is_forbidden(a.ip())).collect();
            if allowed.is_empty() {
                return Err(format!("{host} resolves only to addresses webhooks may not reach").into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_ranges_are_forbidden_and_public_ones_not() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.100.100.200",
            "224.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "fc00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "ff02::1",
        ] {
            assert!(is_forbidden(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "100.128.0.1", "172.32.0.1"] {
            assert!(!is_forbidden(ip.parse().unwrap()), "{ip}");
        }
    }

    fn forbidden(ip: &str) -> bool {
        is_forbidden(ip.parse().unwrap())
    }

    #[test]
    fn ipv4_compatible_addresses_are_judged_by_their_ipv4() {
        assert!(forbidden("::127.0.0.1"));
        assert!(forbidden("::10.0.0.1"));
        assert!(forbidden("::169.254.169.254"));
        assert!(!forbidden("::8.8.8.8"));
    }

    #[test]
    fn ipv4_translated_addresses_are_judged_by_their_ipv4() {
        assert!(forbidden("::ffff:0:7f00:1"));
        assert!(forbidden("::ffff:0:a9fe:a9fe"));
        assert!(!forbidden("::ffff:0:808:808"));
    }

    #[test]
    fn six_to_four_addresses_are_judged_by_their_ipv4() {
        assert!(forbidden("2002:7f00:1::"));
        assert!(forbidden("2002:c0a8:101::1"), "192.168.1.1");
        assert!(forbidden("2002:a9fe:a9fe:1:2:3:4:5"), "169.254.169.254");
        assert!(!forbidden("2002:808:808::1"));
    }

    #[test]
    fn nat64_addresses_are_judged_by_their_ipv4() {
        assert!(forbidden("64:ff9b::7f00:1"));
        assert!(forbidden("64:ff9b::a00:1"));
        assert!(!forbidden("64:ff9b::808:808"));
        // The local-use prefix: where the IPv4 address sits is the local operator's choice.
        assert!(forbidden("64:ff9b:1::808:808"));
        assert!(forbidden("64:ff9b:1:7f00:0:100::"));
    }

    #[test]
    fn teredo_addresses_are_judged_by_server_and_client() {
        // Server 65.54.227.120, client 8.8.8.8 (obfuscated: f7f7:f7f7): both public.
        assert!(!forbidden("2001:0:4136:e378:8000:63bf:f7f7:f7f7"));
        // Client 127.0.0.1 (obfuscated: 80ff:fffe).
        assert!(forbidden("2001:0:4136:e378:8000:63bf:80ff:fffe"));
        // Client 10.0.0.1 (obfuscated: f5ff:fffe).
        assert!(forbidden("2001:0:4136:e378:8000:63bf:f5ff:fffe"));
        // Server 192.168.0.1, client public.
        assert!(forbidden("2001:0:c0a8:1:8000:63bf:f7f7:f7f7"));
    }

    #[test]
    fn ordinary_ipv6_addresses_are_not_taken_for_embedded_ones() {
        for ip in ["2606:4700:4700::1111", "2001:4860:4860::8888", "2a00:1450:4001:80b::200e"] {
            assert!(!forbidden(ip), "{ip}");
        }
    }

    #[tokio::test]
    async fn the_delivery_resolver_never_returns_a_forbidden_address() {
        use reqwest::dns::Resolve;
        use std::str::FromStr;
        let name = reqwest::dns::Name::from_str("localhost").unwrap();
        assert!(GuardedResolver.resolve(name).await.is_err(), "localhost resolves only to loopback");
    }

    #[tokio::test]
    async fn a_hostname_that_resolves_to_loopback_is_refused() {
        let url = Url::parse("http://localhost:9/hook").unwrap();
        assert!(matches!(check_target(&url).await, Err(TargetError::Forbidden(_))));
        let url = Url::parse("http://169.254.169.254/latest/meta-data").unwrap();
        assert!(matches!(check_target(&url).await, Err(TargetError::Forbidden(_))));
    }
}
