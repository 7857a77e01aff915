//! The x86_64 kernel matrix (scenarios/matrix/x86_64.toml) on the kernels
//! other than the project's own build (the whole suite on that one is
//! tests/scenarios.rs): Debian's 7.3 and 6.12 cloud kernels, unpatched, with the
//! scenarios the matrix gives them. Fails on any failed scenario, and on a
//! kernel whose agent reports other features than its entry says it lacks;
//! an n/a (a scenario the kernel cannot run) is not a failure.

#[test]
fn the_distribution_kernels_pass_what_they_can_run() {
    integration::distribution_kernels_pass_what_they_can_run(lab::Arch::X86_64);
}
