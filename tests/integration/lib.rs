//! rasvmm's integration tests live in tests/: they boot real Linux guests
//! through the `lab` harness (hardware KVM directly, else the lab host).
//! A missing prerequisite (images, QEMU) fails the tests with a message.
