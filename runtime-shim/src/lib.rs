//! hako container shim: namespaces, cgroups and OCI image rootfs for one container
