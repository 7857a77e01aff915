#!/usr/bin/env bash
# Fuzzes the parsers that read untrusted input (fuzz/fuzz_targets: the guest
# agent's lines, control API requests and their line framing, raw CPER records, the guest's accesses to the EINJ window, the guest's KHO FDT and blobs (and the observer over a whole small guest RAM), steps and scenario files) for a
# bounded time each: RASVMM_FUZZ_SECONDS, default 20. New inputs go to a
# scratch directory; the seed corpus in fuzz/corpus is read only. A crash
# fails with libFuzzer's report and the input saved under fuzz/artifacts/.
# cargo-fuzz runs on the stable toolchain with RUSTC_BOOTSTRAP=1; no
# sanitizer (the parsers are safe Rust: the bugs sought are panics and
# unbounded growth).
source "$(dirname "$0")/lib.sh"
seconds=${RASVMM_FUZZ_SECONDS:-20}
command -v cargo-fuzz >/dev/null || die "cargo-fuzz is missing: run scripts/install-deps.sh"
cd "$RASVMM_ROOT/fuzz"
for t in agent_line api_request api_framing cper einj kho kho_observe scenario; do
	work=$(mktemp -d)
	# Framing needs inputs past MAX_LINE (64 KiB) to reach a line too long.
	max_len=65536
	[ "$t" = api_framing ] && max_len=140000
	# The observer's target takes a whole 256 KiB guest RAM image.
	[ "$t" = kho_observe ] && max_len=262272
	log "fuzzing $t for ${seconds}s"
	RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" --sanitizer none "$work" "corpus/$t" -- \
		-max_total_time="$seconds" -max_len="$max_len" 2>"$work.log" ||
		{ tail -n 40 "$work.log" >&2; die "fuzz target $t failed (see fuzz/artifacts/$t)"; }
	grep -E '^Done' "$work.log" >&2 || true
	rm -rf "$work" "$work.log"
done
