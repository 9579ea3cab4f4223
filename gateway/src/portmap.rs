//! The agent's UPnP-IGD port mapping (issue 18): SSDP discovery of the router's
//! WANIPConnection service, AddPortMapping (the internal port first, so the mapped
//! endpoint keeps the agent's port, then AddAnyPortMapping), renewal and
//! DeletePortMapping, through the `igd-next` crate. PCP and NAT-PMP are the sans-IO
//! [`PortMapClient`](gateway_proto::portmap::PortMapClient) on the agent's own
//! socket; UPnP is HTTP and SOAP over TCP with XML descriptions, where a maintained
//! crate pays: igd-next is the maintained fork of `igd`, used by libp2p, and its
//! blocking API (no HTTP stack beyond `attohttpc`) runs here on a blocking thread.
//! Its result joins the client through `handle_upnp_mapping`.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use gateway_proto::portmap::{MappedTransport, Mapping, MappingProtocol, ProtocolOutcome};
use igd_next::{AddAnyPortError, AddPortError, PortMappingProtocol, SearchError, SearchOptions};

/// How long SSDP discovery waits for the router (a router without UPnP costs this).
pub const UPNP_SEARCH_TIMEOUT: Duration = Duration::from_secs(3);
/// What the mapping is called in the router's table.
const DESCRIPTION: &str = "gateway peer";

/// A UPnP-IGD mapping held on the router.
#[derive(Debug)]
pub struct UpnpMapping {
    router: igd_next::Gateway,
    local: SocketAddr,
    transport: MappedTransport,
    lifetime: Duration,
    /// The mapping as the port-mapping client knows it.
    pub mapping: Mapping,
    /// When it was granted or last renewed.
    pub granted_at: Instant,
}

fn protocol(transport: MappedTransport) -> PortMappingProtocol {
    match transport {
        MappedTransport::Udp => PortMappingProtocol::UDP,
        MappedTransport::Tcp => PortMappingProtocol::TCP,
    }
}

fn lease_secs(lifetime: Duration) -> u32 {
    // 0 would ask for a permanent lease: never ask for one.
    u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX).max(1)
}

fn search_outcome(e: SearchError) -> ProtocolOutcome {
    match e {
        SearchError::NoResponseWithinTimeout => ProtocolOutcome::NoAnswer,
        other => ProtocolOutcome::Error(format!("UPnP discovery: {other}")),
    }
}

/// Finds the router's UPnP-IGD service from `local` (the agent's LAN address and
/// port, which the mapping points at) and maps `local`'s port for `lifetime`.
/// Blocking (SSDP, then HTTP): run it on a blocking thread. A router without UPnP
/// costs [`UPNP_SEARCH_TIMEOUT`].
pub fn upnp_map(
    local: SocketAddr,
    transport: MappedTransport,
    lifetime: Duration,
) -> Result<UpnpMapping, ProtocolOutcome> {
    if local.ip().is_unspecified() || local.port() == 0 {
        return Err(ProtocolOutcome::Error(format!(
            "UPnP needs the LAN address and port to map, not {local}"
        )));
    }
    let mut options = SearchOptions::default();
    options.bind_addr = SocketAddr::new(local.ip(), 0);
    options.timeout = Some(UPNP_SEARCH_TIMEOUT);
    options.single_search_timeout = Some(UPNP_SEARCH_TIMEOUT);
    let router = igd_next::search_gateway(options).map_err(search_outcome)?;
    let external_ip = router
        .get_external_ip()
        .map_err(|e| ProtocolOutcome::Error(format!("UPnP GetExternalIPAddress: {e}")))?;
    if external_ip.is_unspecified() {
        return Err(ProtocolOutcome::Unusable);
    }
    let lease = lease_secs(lifetime);
    let proto = protocol(transport);
    let port = match router.add_port(proto, local.port(), local, lease, DESCRIPTION) {
        Ok(()) => local.port(),
        Err(AddPortError::PortInUse | AddPortError::SamePortValuesRequired) => router
            .add_any_port(proto, local, lease, DESCRIPTION)
            .map_err(|e| match e {
                AddAnyPortError::ActionNotAuthorized => ProtocolOutcome::Refused {
                    code: 606,
                    text: "action not authorized",
                },
                other => ProtocolOutcome::Error(format!("UPnP AddAnyPortMapping: {other}")),
            })?,
        Err(AddPortError::ActionNotAuthorized) => {
            return Err(ProtocolOutcome::Refused {
                code: 606,
                text: "action not authorized",
            });
        }
        Err(other) => {
            return Err(ProtocolOutcome::Error(format!(
                "UPnP AddPortMapping: {other}"
            )));
        }
    };
    Ok(UpnpMapping {
        router,
        local,
        transport,
        lifetime,
        mapping: Mapping {
            protocol: MappingProtocol::Upnp,
            external: SocketAddr::new(external_ip, port),
            lifetime,
        },
        granted_at: Instant::now(),
    })
}

impl UpnpMapping {
    /// When to renew: half the lease after it was granted.
    pub fn renew_at(&self) -> Instant {
        self.granted_at + self.lifetime / 2
    }

    /// Renews the lease (AddPortMapping again for the same external port). Blocking.
    pub fn renew(&mut self) -> Result<Mapping, ProtocolOutcome> {
        self.router
            .add_port(
                protocol(self.transport),
                self.mapping.external.port(),
                self.local,
                lease_secs(self.lifetime),
                DESCRIPTION,
            )
            .map_err(|e| ProtocolOutcome::Error(format!("UPnP renewal: {e}")))?;
        self.granted_at = Instant::now();
        Ok(self.mapping)
    }

    /// Deletes the mapping (DeletePortMapping). Blocking.
    pub fn delete(self) -> Result<(), ProtocolOutcome> {
        self.router
            .remove_port(protocol(self.transport), self.mapping.external.port())
            .map_err(|e| ProtocolOutcome::Error(format!("UPnP DeletePortMapping: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_never_permanent_and_fit_the_field() {
        assert_eq!(lease_secs(Duration::ZERO), 1);
        assert_eq!(lease_secs(Duration::from_secs(7200)), 7200);
        assert_eq!(lease_secs(Duration::from_secs(u64::MAX)), u32::MAX);
    }

    #[test]
    fn a_wildcard_or_portless_local_address_is_refused_before_any_packet() {
        for local in ["0.0.0.0:4500", "10.0.0.2:0"] {
            let local: SocketAddr = local.parse().expect("addr");
            assert!(matches!(
                upnp_map(local, MappedTransport::Udp, Duration::from_secs(60)),
                Err(ProtocolOutcome::Error(_))
            ));
        }
    }
}
