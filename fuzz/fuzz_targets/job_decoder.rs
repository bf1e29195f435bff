//! Any body a backend may publish: parsing and validation never panic, every rejection has a
//! reason, an accepted job re-serialises to a body that parses back to the same job, and the work
//! order round-trips.
#![no_main]

use ditfleet_common::job::{JobError, JobSpec, Limits, WorkOrder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = JobSpec::sniff_job_id(data);
    let _ = WorkOrder::decode(data);
    match JobSpec::parse(data) {
        Err(JobError::Malformed(reason)) => assert!(!reason.is_empty()),
        Err(JobError::Invalid(_)) => unreachable!("parse only reports malformed bodies"),
        Ok(spec) => match spec.validate(&Limits::default()) {
            Err(e) => assert!(!e.to_string().is_empty()),
            Ok(()) => {
                let body = serde_json::to_vec(&spec).expect("a valid job serialises");
                assert_eq!(JobSpec::parse(&body).expect("re-parses"), spec);
                let order = WorkOrder::from_spec(&spec, "small", 1, 2);
                assert_eq!(WorkOrder::decode(&order.encode()).expect("decodes"), order);
            }
        },
    }
});
