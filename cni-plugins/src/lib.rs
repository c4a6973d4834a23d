//! hako CNI plugin: bridge, veth, IPAM and VXLAN overlay (CNI spec 1.1)
