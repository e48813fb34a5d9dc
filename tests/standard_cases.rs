//! Every standard conformance case on the CPU backend, against the serial oracle.

use switchyard::conformance::{run_case_cpu, standard_cases};

#[test]
fn every_standard_case_passes_on_cpu() {
    let cases = standard_cases();
    assert!(cases.len() >= 10, "the standard suite shrank to {} cases", cases.len());
    let mut failed = Vec::new();
    for case in &cases {
        let r = run_case_cpu(case);
        if !r.passed() {
            failed.push(format!("{}: wrong={} error={:?}", r.name, r.wrong, r.error));
        }
    }
    assert!(failed.is_empty(), "failed cases:\n{}", failed.join("\n"));
}
