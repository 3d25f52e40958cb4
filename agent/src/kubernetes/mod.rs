//! Kubernetes as a source of the mesh: `model` turns API objects into the config file's terms,
//! `watch` keeps them current with kube-rs watchers and reflectors.
pub mod model;
