//! hako CNI plugin library: CNI version negotiation and result shapes (pure).

pub mod version;
