//! hako service proxier: Services and EndpointSlices as iptables, nftables and IPVS rules
