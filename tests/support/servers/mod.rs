//! Real cache servers for the remote plugins' tests, each started on
//! 127.0.0.1 on a free port in a temporary directory, and killed when dropped.
//! The binaries come from `.ci/tools/*.sh` (found with `support::tool`).
pub mod nginx;
pub mod redis;
pub mod s3;
pub mod wsgidav;
