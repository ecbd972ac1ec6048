//! A listener address: `127.0.0.1:15001`, or `{address: 0.0.0.0:15001, allow_non_loopback: true}`.

use std::fmt;
use std::net::SocketAddr;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// Where a listener binds, and whether a non-loopback address was asked for on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ListenAddr {
    /// The socket address.
    pub address: SocketAddr,
    /// Set when the operator explicitly accepts a non-loopback plaintext listener.
    pub allow_non_loopback: bool,
}

impl ListenAddr {
    /// A listener address.
    pub const fn new(address: SocketAddr, allow_non_loopback: bool) -> Self {
        ListenAddr {
            address,
            allow_non_loopback,
        }
    }
}

fn parse_addr<E: de::Error>(s: &str) -> Result<SocketAddr, E> {
    s.trim().parse().map_err(|_| {
        E::custom(format!(
            "`{s}` is not an IP:port address (e.g. 127.0.0.1:15001 or [::1]:15001)"
        ))
    })
}

struct ListenVisitor;

impl<'de> Visitor<'de> for ListenVisitor {
    type Value = ListenAddr;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an IP:port string, or a map with `address` and `allow_non_loopback`")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<ListenAddr, E> {
        Ok(ListenAddr::new(parse_addr(v)?, false))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ListenAddr, A::Error> {
        let mut address = None;
        let mut allow = false;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "address" => {
                    let s: String = map.next_value()?;
                    address = Some(parse_addr(&s)?);
                }
                "allow_non_loopback" => allow = map.next_value()?,
                other => {
                    return Err(de::Error::unknown_field(other, &["address", "allow_non_loopback"]));
                }
            }
        }
        let address = address.ok_or_else(|| de::Error::missing_field("address"))?;
        Ok(ListenAddr::new(address, allow))
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ListenVisitor)
    }
}
