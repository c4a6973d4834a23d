//! Services through the `hako-proxier` library: standalone mode's Services with endpoints from
//! local pods ([`standalone`]) and cluster mode's in-agent proxier ([`cluster`]).

pub mod cluster;
pub mod standalone;
