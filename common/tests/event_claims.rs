//! The done-event claim protocol on a real Redis: exactly one claimant publishes a settled job's
//! event. Two deliveries of the same job on ONE worker are different claimants (the finishing
//! task and a redelivered copy must not both publish); a dead worker's claim passes on once its
//! registration expires; an expired claim passes on; a published event is never claimed again.

use std::time::Duration;

use ditfleet_common::state::{EventClaim, JobStore, event_claimant};

async fn store() -> JobStore {
    let ns = format!("test-claims-{}", std::process::id());
    JobStore::connect("redis://127.0.0.1:6379/0", &ns, Duration::from_secs(60))
        .await
        .expect("Redis at 127.0.0.1:6379 (make test starts it)")
}

#[tokio::test]
async fn one_claimant_per_delivery_publishes_and_a_dead_workers_claim_passes_on() {
    let s = store().await;
    let lease = Duration::from_secs(60);
    s.register_worker("w1", "{}", Duration::from_secs(30))
        .await
        .unwrap();
    s.register_worker("w2", "{}", Duration::from_secs(30))
        .await
        .unwrap();
    let (finisher, copy) = (event_claimant("w1"), event_claimant("w1"));
    assert_ne!(finisher, copy);
    assert!(finisher.starts_with("w1#"));

    // The finishing task holds the claim (as the success transition records it).
    let until = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        + lease)
        .as_millis();
    s.set_fields(
        "j1",
        &[
            ("state", "succeeded".into()),
            ("event_owner", finisher.clone()),
            ("event_until_ms", until.to_string()),
        ],
    )
    .await
    .unwrap();
    // A redelivered copy on the same worker waits; so does one on another worker.
    assert!(
        matches!(s.claim_event("j1", &copy, lease).await.unwrap(), EventClaim::Held { ref owner, .. } if *owner == finisher)
    );
    let other = event_claimant("w2");
    assert!(matches!(
        s.claim_event("j1", &other, lease).await.unwrap(),
        EventClaim::Held { .. }
    ));
    // The holder itself may claim again (a retry of its own call).
    assert_eq!(
        s.claim_event("j1", &finisher, lease).await.unwrap(),
        EventClaim::Claimed
    );

    // The finishing worker dies: its registration goes, and the claim passes on.
    s.deregister_worker("w1").await.unwrap();
    assert_eq!(
        s.claim_event("j1", &other, lease).await.unwrap(),
        EventClaim::Claimed
    );
    // Now w2's claimant holds it; w2 lives, so a third claimant waits.
    assert!(matches!(
        s.claim_event("j1", &event_claimant("w2"), lease).await.unwrap(),
        EventClaim::Held { .. }
    ));
    // An expired claim (the holder gave up: event_until_ms 0) passes on although w2 lives.
    s.set_fields("j1", &[("event_until_ms", "0".into())])
        .await
        .unwrap();
    assert_eq!(
        s.claim_event("j1", &copy, lease).await.unwrap(),
        EventClaim::Claimed
    );
    // Once published, nobody claims it again.
    s.set_fields("j1", &[("event_published", "1".into())])
        .await
        .unwrap();
    assert_eq!(
        s.claim_event("j1", &other, lease).await.unwrap(),
        EventClaim::Published
    );

    s.deregister_worker("w2").await.unwrap();
}
