//! Pod sources: the manifest directory (parsed and diffed by the pure [`manifest`], read by
//! [`dir`], woken by [`dirwatch`]) and the apiserver ([`apiserver`]: watch, admission, status).

pub mod apiserver;
pub mod dir;
pub mod dirwatch;
pub mod manifest;
