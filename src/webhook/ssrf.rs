//! Keeps webhooks away from the server's own network: loopback, private, link-local, CGNAT, multicast and cloud
//! metadata addresses are refused, both when a request names the URL and on the address actually connected to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use url::{Host, Url};

/// Whether a webhook may not connect to this address.
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_v4(v4);
            }
            let s = v6.segments();
            // NAT64 (64:ff9b::/96) embeds an IPv4 address in its last 32 bits.
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                return forbidden_v4(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local, includes fd00:ec2::254 (cloud metadata)
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || v6 == Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 1)
        }
    }
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
