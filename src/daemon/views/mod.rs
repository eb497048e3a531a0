//! How the API versions show the operations' results and read their
//! requests. v1's own views stay in `api`; v2 and v3 are Cinder's shapes,
//! one set of functions for both, switched by `cinder::Api`.

pub mod cinder;
pub mod request;
