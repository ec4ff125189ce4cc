//! The Kubernetes lease backend and pod labeller against kube's mocked API
//! service (tower-test): each test states the exact requests expected.

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::Pod;
use kube::client::Body;
use kube::{Api, Client};
use pushcluster_lease::kubernetes::{KubeLeases, PodLabeler};
use pushcluster_lease::owner::{Ownership, ShardOwner};
use pushcluster_lease::{Candidate, LeaseBackend, LeaseTiming};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ns/leases";

fn client() -> (Client, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "ns"), handle)
}

fn me() -> Candidate {
    Candidate {
        holder: "comet-a".into(),
        rpc: "http://10.0.0.1:6970".into(),
        ws: "10.0.0.1:6968".into(),
        tcp: "10.0.0.1:6969".into(),
    }
}

fn status(code: u16, reason: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": reason, "reason": reason, "code": code}),
    )
}

fn lease(rv: &str, holder: Option<&str>, renew: &str, transitions: i32) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "pc-comet-0", "namespace": "ns", "resourceVersion": rv,
                     "labels": {"pushcluster.io/cluster": "pc", "pushcluster.io/shard": "0"}},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 10,
                 "renewTime": renew, "leaseTransitions": transitions}
    })
}

/// Answers the next request, after checking its method and path; returns its body.
async fn expect(h: &mut Handle, method: Method, path: &str, reply: (u16, Value)) -> Value {
    let (req, send) = h.next_request().await.expect("a request");
    assert_eq!(req.method(), method, "method of {}", req.uri());
    assert_eq!(req.uri().path(), path);
    let body = req.into_body().collect_bytes().await.unwrap();
    let sent = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap()
    };
    send.send_response(
        Response::builder()
            .status(reply.0)
            .body(Body::from(serde_json::to_vec(&reply.1).unwrap()))
            .unwrap(),
    );
    sent
}

#[tokio::test]
async fn acquiring_a_missing_lease_creates_it() {
    let (c, mut h) = client();
    // Owned by the PushCluster, so deleting it deletes the Lease.
    let leases = KubeLeases::new(Api::namespaced(c, "ns"), "pc").owned_by(Some(
        pushcluster_lease::kubernetes::push_cluster_owner("pc", "uid-1"),
    ));
    let server = tokio::spawn(async move {
        expect(
            &mut h,
            Method::GET,
            &format!("{LEASES}/pc-comet-0"),
            status(404, "NotFound"),
        )
        .await;
        let created = expect(
            &mut h,
            Method::POST,
            LEASES,
            (
                201,
                lease("1", Some("comet-a"), "2026-01-01T00:00:00.000000Z", 1),
            ),
        )
        .await;
        assert_eq!(created["metadata"]["name"], "pc-comet-0");
        assert_eq!(
            created["metadata"]["labels"]["pushcluster.io/cluster"],
            "pc"
        );
        assert_eq!(created["metadata"]["labels"]["pushcluster.io/shard"], "0");
        assert_eq!(
            created["metadata"]["annotations"]["pushcluster.io/ws"],
            "10.0.0.1:6968"
        );
        assert_eq!(created["spec"]["holderIdentity"], "comet-a");
        let owner = &created["metadata"]["ownerReferences"][0];
        assert_eq!(
            (&owner["kind"], &owner["name"], &owner["uid"]),
            (&"PushCluster".into(), &"pc".into(), &"uid-1".into())
        );
        assert_eq!(created["spec"]["leaseTransitions"], 1);
        assert_eq!(created["spec"]["leaseDurationSeconds"], 6);
        assert!(created["spec"]["renewTime"].is_string());
    });
    let held = leases
        .try_acquire(0, &me(), Duration::from_secs(6))
        .await
        .unwrap()
        .expect("acquired");
    assert_eq!(held.record.token, 1);
    server.await.unwrap();
}

#[tokio::test]
async fn a_create_race_lost_with_409_is_not_an_error() {
    let (c, mut h) = client();
    let leases = KubeLeases::new(Api::namespaced(c, "ns"), "pc");
    let server = tokio::spawn(async move {
        expect(
            &mut h,
            Method::GET,
            &format!("{LEASES}/pc-comet-0"),
            status(404, "NotFound"),
        )
        .await;
        expect(&mut h, Method::POST, LEASES, status(409, "AlreadyExists")).await;
    });
    assert!(leases
        .try_acquire(0, &me(), Duration::from_secs(6))
        .await
        .unwrap()
        .is_none());
    server.await.unwrap();
}

/// Clock skew: the holder's renewTime is far in the past by this process's
/// wall clock, as if the clocks disagreed, yet the lease counts as held for
/// its full duration from when it was observed here.
#[tokio::test(start_paused = true)]
async fn skewed_renew_times_do_not_expire_a_lease_early_and_an_expired_one_is_replaced_with_its_resource_version(
) {
    let (c, mut h) = client();
    let leases = KubeLeases::new(Api::namespaced(c, "ns"), "pc");
    let theirs = lease("7", Some("comet-b"), "2026-01-01T00:00:00.000000Z", 3);
    let server = tokio::spawn(async move {
        let path = format!("{LEASES}/pc-comet-0");
        // Held and just observed: no write at all.
        expect(&mut h, Method::GET, &path, (200, theirs.clone())).await;
        // Unchanged for longer than its duration: expired. The replace carries
        // resourceVersion 7; somebody else wins (409).
        expect(&mut h, Method::GET, &path, (200, theirs.clone())).await;
        let put = expect(&mut h, Method::PUT, &path, status(409, "Conflict")).await;
        assert_eq!(put["metadata"]["resourceVersion"], "7");
        assert_eq!(put["spec"]["holderIdentity"], "comet-a");
        assert_eq!(put["spec"]["leaseTransitions"], 4);
        // The winner renewed (new renewTime): observed anew, so valid again.
        let renewed = lease("8", Some("comet-c"), "2026-01-01T00:00:11.000000Z", 4);
        expect(&mut h, Method::GET, &path, (200, renewed.clone())).await;
        // After its duration without change it is ours.
        expect(&mut h, Method::GET, &path, (200, renewed)).await;
        let put = expect(
            &mut h,
            Method::PUT,
            &path,
            (
                200,
                lease("9", Some("comet-a"), "2026-01-01T00:00:22.000000Z", 5),
            ),
        )
        .await;
        assert_eq!(put["metadata"]["resourceVersion"], "8");
    });
    let ttl = Duration::from_secs(10);
    assert!(leases.try_acquire(0, &me(), ttl).await.unwrap().is_none());
    tokio::time::advance(Duration::from_secs(11)).await;
    assert!(
        leases.try_acquire(0, &me(), ttl).await.unwrap().is_none(),
        "lost the race"
    );
    assert!(
        leases.try_acquire(0, &me(), ttl).await.unwrap().is_none(),
        "fresh holder"
    );
    tokio::time::advance(Duration::from_secs(11)).await;
    let held = leases
        .try_acquire(0, &me(), ttl)
        .await
        .unwrap()
        .expect("expired lease taken");
    assert_eq!(held.record.token, 5);
    server.await.unwrap();
}

/// The API server stops answering for longer than the lease: when it is
/// back, the lease is unchanged (its holder could not renew either). A
/// standby that could not read meanwhile observes it afresh instead of
/// taking it; once the holder renews, nothing changes hands.
#[tokio::test(start_paused = true)]
async fn a_lease_unchanged_across_an_api_outage_is_not_taken() {
    let (c, mut h) = client();
    let leases = KubeLeases::new(Api::namespaced(c, "ns"), "pc");
    let theirs = lease("7", Some("comet-b"), "2026-01-01T00:00:00.000000Z", 3);
    let server = tokio::spawn(async move {
        let path = format!("{LEASES}/pc-comet-0");
        expect(&mut h, Method::GET, &path, (200, theirs.clone())).await;
        // The outage: the read fails.
        expect(
            &mut h,
            Method::GET,
            &path,
            status(503, "ServiceUnavailable"),
        )
        .await;
        // Back, 11 s after the first look: same lease, yet not expired.
        expect(&mut h, Method::GET, &path, (200, theirs.clone())).await;
        // And a read that hangs past the outage counts the same.
        let (req, send) = h.next_request().await.expect("a request");
        assert_eq!(req.uri().path(), path);
        tokio::time::sleep(Duration::from_secs(12)).await;
        send.send_response(
            Response::builder()
                .status(200)
                .body(Body::from(serde_json::to_vec(&theirs).unwrap()))
                .unwrap(),
        );
    });
    let ttl = Duration::from_secs(10);
    assert!(leases.try_acquire(0, &me(), ttl).await.unwrap().is_none());
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(leases.try_acquire(0, &me(), ttl).await.is_err());
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!(
        leases.try_acquire(0, &me(), ttl).await.unwrap().is_none(),
        "a lease unchanged across an outage was taken"
    );
    assert!(
        leases.try_acquire(0, &me(), ttl).await.unwrap().is_none(),
        "a lease unchanged across a hung read was taken"
    );
    server.await.unwrap();
}

#[tokio::test]
async fn renew_and_release_carry_the_resource_version_and_a_conflict_is_checked_by_reading_back() {
    let (c, mut h) = client();
    let leases = KubeLeases::new(Api::namespaced(c, "ns"), "pc");
    let server = tokio::spawn(async move {
        let path = format!("{LEASES}/pc-comet-0");
        expect(&mut h, Method::GET, &path, status(404, "NotFound")).await;
        expect(
            &mut h,
            Method::POST,
            LEASES,
            (
                201,
                lease("1", Some("comet-a"), "2026-01-01T00:00:00.000000Z", 1),
            ),
        )
        .await;
        let put = expect(
            &mut h,
            Method::PUT,
            &path,
            (
                200,
                lease("2", Some("comet-a"), "2026-01-01T00:00:01.000000Z", 1),
            ),
        )
        .await;
        assert_eq!(put["metadata"]["resourceVersion"], "1");
        assert_ne!(put["spec"]["renewTime"], "2026-01-01T00:00:00.000000Z");
        // A renewal the API server applied late moved the resourceVersion:
        // 409, but the Lease is still ours (same holder, same acquisition),
        // so it is renewed on the version read back.
        let put = expect(&mut h, Method::PUT, &path, status(409, "Conflict")).await;
        assert_eq!(put["metadata"]["resourceVersion"], "2");
        let ours = lease("5", Some("comet-a"), "2026-01-01T00:00:02.000000Z", 1);
        expect(&mut h, Method::GET, &path, (200, ours)).await;
        let put = expect(
            &mut h,
            Method::PUT,
            &path,
            (
                200,
                lease("6", Some("comet-a"), "2026-01-01T00:00:03.000000Z", 1),
            ),
        )
        .await;
        assert_eq!(put["metadata"]["resourceVersion"], "5");
        // Taken by another holder meanwhile: lost.
        expect(&mut h, Method::PUT, &path, status(409, "Conflict")).await;
        let theirs = lease("7", Some("comet-b"), "2026-01-01T00:00:09.000000Z", 2);
        expect(&mut h, Method::GET, &path, (200, theirs)).await;
        // Releasing what is no longer ours changes nothing (409 is fine).
        let released = expect(&mut h, Method::PUT, &path, status(409, "Conflict")).await;
        assert_eq!(released["metadata"]["resourceVersion"], "6");
        assert!(released["spec"]["holderIdentity"].is_null());
    });
    let ttl = Duration::from_secs(6);
    let held = leases.try_acquire(0, &me(), ttl).await.unwrap().unwrap();
    assert!(leases.renew(&held, ttl).await.unwrap());
    assert!(
        leases.renew(&held, ttl).await.unwrap(),
        "409 from a late renewal of our own: still ours"
    );
    assert!(
        !leases.renew(&held, ttl).await.unwrap(),
        "409 and another holder: lost"
    );
    leases.release(&held).await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn the_pod_is_labelled_with_its_shard_and_unlabelled_after() {
    // A holder also costs more to delete, so rollouts remove standbys first.
    let (c, mut h) = client();
    let labeler = PodLabeler::new(Api::<Pod>::namespaced(c, "ns"), "comet-x");
    let server = tokio::spawn(async move {
        let path = "/api/v1/namespaces/ns/pods/comet-x";
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "comet-x"}});
        let p = expect(&mut h, Method::PATCH, path, (200, pod.clone())).await;
        assert_eq!(
            p,
            json!({"metadata": {"labels": {"pushcluster.io/shard": "3"},
                "annotations": {"controller.kubernetes.io/pod-deletion-cost": "1000"}}})
        );
        let p = expect(&mut h, Method::PATCH, path, (200, pod)).await;
        assert_eq!(
            p,
            json!({"metadata": {"labels": {"pushcluster.io/shard": null},
                "annotations": {"controller.kubernetes.io/pod-deletion-cost": null}}})
        );
    });
    labeler.set_shard(Some(3)).await.unwrap();
    labeler.set_shard(None).await.unwrap();
    server.await.unwrap();
}

/// A standby with a 60 s retry period takes a lease within moments of its
/// release, because the lease watch wakes it.
#[tokio::test]
async fn a_released_lease_is_taken_at_once_because_the_watch_wakes_the_standby() {
    let (c, mut h) = client();
    let leases = Arc::new(KubeLeases::new(Api::namespaced(c, "ns"), "pc"));
    leases.spawn_watcher(CancellationToken::new());
    let released = Arc::new(tokio::sync::Notify::new());
    let held_by_b = lease("7", Some("comet-b"), "2026-01-01T00:00:00.000000Z", 1);
    let free = lease("8", None, "2026-01-01T00:00:00.000000Z", 1);
    let fake = {
        let released = released.clone();
        tokio::spawn(async move {
            // Free from the moment the release is announced on the watch.
            let is_free = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let mut watches = Vec::new();
            while let Some((req, send)) = h.next_request().await {
                let (method, uri) = (req.method().clone(), req.uri().to_string());
                let current = if is_free.load(std::sync::atomic::Ordering::SeqCst) {
                    free.clone()
                } else {
                    held_by_b.clone()
                };
                let reply = |v: Value| {
                    Response::builder()
                        .body(Body::from(serde_json::to_vec(&v).unwrap()))
                        .unwrap()
                };
                if uri.contains("watch=true") {
                    // Held open until the lease is released, then one event.
                    let (released, free) = (released.clone(), free.clone());
                    let is_free = is_free.clone();
                    watches.push(tokio::spawn(async move {
                        released.notified().await;
                        is_free.store(true, std::sync::atomic::Ordering::SeqCst);
                        let ev = json!({"type": "MODIFIED", "object": free});
                        send.send_response(
                            Response::builder()
                                .body(Body::from(format!("{ev}\n").into_bytes()))
                                .unwrap(),
                        );
                    }));
                } else if method == Method::GET && uri.starts_with(&format!("{LEASES}?")) {
                    send.send_response(reply(json!({"apiVersion": "v1", "kind": "LeaseList",
                        "metadata": {"resourceVersion": "7"}, "items": [current]})));
                } else if method == Method::GET {
                    send.send_response(reply(current));
                } else if method == Method::PUT {
                    send.send_response(reply(lease(
                        "9",
                        Some("comet-a"),
                        "2026-01-01T00:00:01.000000Z",
                        2,
                    )));
                    return uri;
                } else {
                    panic!("unexpected {method} {uri}");
                }
            }
            String::new()
        })
    };
    let timing = LeaseTiming {
        duration_ms: 120_000,
        renew_deadline_ms: 90_000,
        retry_period_ms: 60_000,
    };
    let (owner, mut rx) = ShardOwner::new(leases, me(), 1, None, timing);
    let cancel = CancellationToken::new();
    tokio::spawn(owner.run(cancel.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(*rx.borrow(), Ownership::Standby, "held by comet-b");
    let t0 = std::time::Instant::now();
    released.notify_waiters();
    tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|o| o.shard() == Some(0)),
    )
    .await
    .expect("acquired long before the 60 s retry period")
    .unwrap();
    eprintln!("acquired {:?} after the release event", t0.elapsed());
    let put_uri = tokio::time::timeout(Duration::from_secs(1), fake)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        put_uri.split('?').next(),
        Some(format!("{LEASES}/pc-comet-0").as_str())
    );
    cancel.cancel();
}

/// Writes refused (403): the API server answers reads but not writes, so a
/// Lease that stops being renewed proves nothing about its holder. While no
/// Lease has changed since a takeover write was refused, a lapsed Lease whose
/// holder still accepts connections is left alone; once one changes, writes
/// work again and every holder gets a whole lease to renew; a lapsed Lease
/// whose holder does not answer is taken all along.
#[tokio::test(start_paused = true)]
async fn after_a_refused_write_only_a_holder_that_does_not_answer_is_replaced() {
    let (c, mut h) = client();
    let leases = KubeLeases::new(Api::namespaced(c, "ns"), "pc");
    let alive = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let with_rpc = |mut l: Value, rpc: String| {
        l["metadata"]["annotations"] = json!({"pushcluster.io/rpc": rpc});
        l
    };
    let theirs = with_rpc(
        lease("7", Some("comet-b"), "2026-01-01T00:00:00.000000Z", 3),
        format!("http://{}", alive.local_addr().unwrap()),
    );
    let server = tokio::spawn(async move {
        let path = format!("{LEASES}/pc-comet-0");
        expect(&mut h, Method::GET, &path, (200, theirs.clone())).await;
        // Lapsed: the takeover write is refused.
        expect(&mut h, Method::GET, &path, (200, theirs.clone())).await;
        expect(&mut h, Method::PUT, &path, status(403, "Forbidden")).await;
        // Still lapsed, and its holder answers: no write.
        expect(&mut h, Method::GET, &path, (200, theirs.clone())).await;
        // The holder renewed once writes came back: valid, and observed
        // afresh.
        let renewed = with_rpc(
            lease("8", Some("comet-b"), "2026-01-01T00:00:11.000000Z", 3),
            "http://127.0.0.1:1".into(),
        );
        expect(&mut h, Method::GET, &path, (200, renewed.clone())).await;
        // Lapsed again, writes refused again, and now its holder is gone:
        // taken as soon as writes are accepted.
        expect(&mut h, Method::GET, &path, (200, renewed.clone())).await;
        expect(&mut h, Method::PUT, &path, status(403, "Forbidden")).await;
        expect(&mut h, Method::GET, &path, (200, renewed)).await;
        expect(
            &mut h,
            Method::PUT,
            &path,
            (
                200,
                lease("9", Some("comet-a"), "2026-01-01T00:00:22.000000Z", 4),
            ),
        )
        .await;
    });
    let ttl = Duration::from_secs(10);
    assert!(leases.try_acquire(0, &me(), ttl).await.unwrap().is_none());
    tokio::time::advance(Duration::from_secs(11)).await;
    assert!(leases.try_acquire(0, &me(), ttl).await.is_err(), "refused");
    assert!(
        leases.try_acquire(0, &me(), ttl).await.unwrap().is_none(),
        "the holder answers"
    );
    assert!(
        leases.try_acquire(0, &me(), ttl).await.unwrap().is_none(),
        "renewed"
    );
    tokio::time::advance(Duration::from_secs(11)).await;
    assert!(
        leases.try_acquire(0, &me(), ttl).await.is_err(),
        "refused again"
    );
    let held = leases.try_acquire(0, &me(), ttl).await.unwrap();
    assert!(
        held.is_some(),
        "a lapsed lease of a holder that does not answer is taken"
    );
    server.await.unwrap();
}
