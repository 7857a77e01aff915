//! rasvmm: a KVM virtual machine monitor for RAS validation of Linux.
//!
//! - [`config`]: what a VM is made of, validated up front;
//! - [`vm`]: creating the VM, loading the guest, the event session;
//! - [`vcpu`]: vCPU threads;
//! - [`console`], [`agent`]: the two UARTs (console and guest agent);
//! - [`mce`]: KVM machine-check plumbing; [`ghes`]: firmware-first reports
//!   through the guest's APEI GHES error sources; [`kho`]: the guest's own
//!   poison list, read from its KHO state;
//! - [`outcome`]: how a run ended; [`report`]: what a run produced;
//! - [`run`]: a whole run from configuration to report.

pub mod agent;
pub mod api;
pub mod config;
pub mod console;
pub mod ghes;
pub mod kho;
pub mod mce;
pub mod outcome;
pub mod report;
pub mod run;
pub mod scenario;
pub mod steps;
pub mod vcpu;
pub mod vm;
