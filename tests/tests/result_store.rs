//! The S3-compatible result store against a real S3-compatible server (moto, from PyPI).

use std::time::Duration;

use ditfleet_common::job::JobEvent;
use ditfleet_common::state::JobState;
use ditfleet_tests::services::Moto;
use ditfleet_tests::{Fleet, job};

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_go_to_the_s3_bucket_and_status_event_and_ctl_carry_the_object_url() {
    let moto = Moto::start();
    let bucket = "ditfleet-results";
    moto.create_bucket(bucket);
    let fleet = Fleet::new("s3-store").await;
    let prefix = format!("fleet/{}", fleet.ns);
    let env = moto.worker_env(bucket, &prefix, "s3-test-secret");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let _s = fleet.start_scheduler();
    let w = fleet.start_worker("w-s3", &env);
    fleet.wait_workers(1, T).await;
    fleet.submit(&job("s3-1", 3)).await;
    let h = fleet.wait_state("s3-1", JobState::Succeeded, T).await;

    let url = format!("s3://{bucket}/{prefix}/s3-1.png");
    assert_eq!(h["result_url"], url);
    let png = moto
        .get(bucket, &format!("{prefix}/s3-1.png"))
        .await
        .expect("the object exists");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "the object is the PNG");
    assert!(
        std::fs::read_dir(&fleet.result_dir).unwrap().next().is_none(),
        "nothing was written to the local result directory"
    );
    assert!(
        w.log_text().contains(&format!("s3://{bucket}/{prefix}")),
        "the worker logs its store"
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    let done = fleet
        .events
        .for_job("s3-1")
        .into_iter()
        .find_map(|e| match e {
            JobEvent::Done { result_url, .. } => Some(result_url),
            _ => None,
        })
        .expect("done event");
    assert_eq!(done, url);
    let out = fleet.ctl(&["status", "s3-1"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&url));
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_result_urls_fetch_the_png_without_credentials() {
    let moto = Moto::start();
    let bucket = "ditfleet-presigned";
    moto.create_bucket(bucket);
    let fleet = Fleet::new("s3-presign").await;
    let mut env = moto.worker_env(bucket, "img", "s3-test-secret");
    env.push(("DITFLEET_RESULT_PRESIGN_S".into(), "600".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let _s = fleet.start_scheduler();
    let _w = fleet.start_worker("w-presign", &env);
    fleet.wait_workers(1, T).await;
    fleet.submit(&job("ps-1", 2)).await;
    let h = fleet.wait_state("ps-1", JobState::Succeeded, T).await;
    let url = &h["result_url"];
    let prefix = format!("{}/{bucket}/img/ps-1.png?", moto.endpoint());
    assert!(url.starts_with(&prefix), "{url}");
    assert!(
        url.contains("X-Amz-Signature=") && url.contains("X-Amz-Expires=600"),
        "{url}"
    );
    assert!(!url.contains("s3-test-secret"));
    // A plain GET of that URL, no credentials of our own, returns the image.
    let path_and_query = &url[moto.endpoint().len()..];
    let (code, png) = ditfleet_tests::services::http_request(moto.port, "GET", path_and_query, b"").unwrap();
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&png));
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // Without the presigned query the same object is refused (moto checks that a request is
    // authenticated, though not the signature's value: signing is object_store's SigV4 code,
    // which this server cannot verify).
    let bare = path_and_query.split('?').next().unwrap();
    let (code, _) = ditfleet_tests::services::http_request(moto.port, "GET", bare, b"").unwrap();
    assert_eq!(code, 403, "an unsigned GET is refused");
    fleet.teardown().await;
}
