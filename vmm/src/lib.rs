//! rasvmm: a KVM virtual machine monitor for RAS validation of Linux.
//!
//! Modules import downward only. From the bottom:
//! - [`config`], [`outcome`], [`steps`]: what a run is made of and how it
//!   can end (pure);
//! - [`event`]: the events a running VM produces and the queue they travel
//!   on; [`event_loop`]: the session's wait on event-manager;
//! - [`console`], [`agent`]: the two UARTs (console and guest agent);
//!   [`einj`]: the ACPI EINJ register window, where the guest's own
//!   injection requests arrive;
//! - [`ghes_sources`]: the guest's APEI GHES error sources in guest memory;
//!   [`kho_observer`]: the guest's own poison list, read from its KHO state;
//! - [`machine`]: the machine of rasvmm's own architecture, assembled from
//!   the arch crate and the devices (the one place an architecture is
//!   chosen);
//! - [`vcpu`]: vCPU threads and their handles; [`host_errors`]: the thread
//!   that receives the host kernel's early memory-failure reports;
//!   [`host_pages`]: the pages of guest RAM the host has poisoned, found
//!   without touching them;
//! - [`ras_controller`]: every memory error reported to the guest, planned
//!   by the ras crate and delivered to the vCPUs;
//! - [`vm`]: building a VM (memory, guest, devices, vCPUs);
//! - [`host_poison`]: making host memory under rasvmm fail from outside it
//!   (tests);
//! - [`api`]: the control API socket; [`session`], [`session_api`],
//!   [`session_host`] and [`session_einj`]: the event loop that drives a
//!   VM, serves the API, handles host memory failures and answers the
//!   guest's EINJ requests; [`reboot`]: the next boot after a guest
//!   reset, in the same session;
//! - [`report`], [`scenario`], [`verdict`]: what a run produced, what a
//!   scenario expects, and the verdict (pure, typed);
//! - [`run`]: a whole run from configuration to report.

pub mod agent;
pub mod api;
pub mod config;
pub mod console;
pub mod einj;
pub mod event;
pub mod event_loop;
pub mod ghes_sources;
pub mod host_errors;
pub mod host_pages;
pub mod host_poison;
pub mod kho_observer;
pub mod machine;
pub mod outcome;
pub mod ras_controller;
pub mod reboot;
pub mod report;
pub mod run;
pub mod scenario;
pub mod session;
pub mod session_api;
pub mod session_einj;
pub mod session_host;
pub mod steps;
pub mod vcpu;
pub mod verdict;
pub mod vm;
