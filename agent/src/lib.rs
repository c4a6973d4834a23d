//! hako node agent: runs Pods from a manifest directory or a kube-apiserver
