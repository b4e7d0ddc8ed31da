//! Every error counts in the unit it names, keeps the library's code, and a `local::run` closure can
//! pass its own errors (and a panic's message) up to the caller.

use ferroccl::local::{self, Options};
use ferroccl::prelude::*;
use ferroccl::Config;
use std::time::Duration;

fn quick() -> Options {
    Options {
        config: Some(Config::default().with_timeout(Duration::from_secs(20))),
        ..Options::default()
    }
}

#[test]
fn a_short_receive_counts_elements_not_bytes() {
    // rank 0 sends 9 f32, rank 1 posts 8: the text must say 8 and 9 (not 32 and 36 bytes)
    let r = local::run_with(2, &quick(), |c| {
        if c.rank() == 0 {
            c.send(&[1f32; 9], 1, 7)?;
            Ok(None)
        } else {
            let mut v = [0f32; 8];
            Ok(Some(c.recv(&mut v, 0, 7).unwrap_err()))
        }
    })
    .unwrap();
    let e = r[1].as_ref().unwrap();
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                expected: 8,
                got: 9,
                ..
            }
        ),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(text.contains("expected 8 elements, got 9"), "{text}");
    assert!(text.contains("rank 0"), "{text}");
}

#[test]
fn f64_receive_mismatch_counts_f64_elements() {
    let r = local::run_with(2, &quick(), |c| {
        if c.rank() == 0 {
            c.send(&[1f64; 3], 1, 1)?;
            Ok(None)
        } else {
            let mut v = [0f64; 5];
            Ok(Some(c.recv(&mut v, 0, 1).unwrap_err().to_string()))
        }
    })
    .unwrap();
    let text = r[1].as_ref().unwrap();
    assert!(text.contains("expected 5 elements, got 3"), "{text}");
}

#[test]
fn ranks_disagreeing_on_an_all_reduce_length_count_elements() {
    // Rank 0 passes 8 f32, rank 1 passes 9 (no checked mode): whatever algorithm notices it, the
    // message counts elements of f32.
    let r = local::run_with(2, &quick(), |c| {
        let mut v = vec![1f32; 8 + c.rank()];
        Ok(c.all_reduce(&mut v, ReduceOp::Sum)
            .err()
            .map(|e| e.to_string()))
    });
    let texts: Vec<String> = match r {
        Ok(v) => v.into_iter().flatten().collect(),
        Err(e) => vec![e.to_string()],
    };
    assert!(!texts.is_empty(), "a length disagreement went unnoticed");
    // Since issue 19 the messages carry the collective's signature, so the disagreement is a
    // collective mismatch naming both calls' element counts.
    let counted = texts.iter().any(|t| {
        t.contains("expected 8 elements, got 9")
            || t.contains("expected 9 elements, got 8")
            || (t.contains("collective mismatch") && t.contains("x 8") && t.contains("x 9"))
    });
    assert!(counted, "{texts:?}");
    assert!(
        texts.iter().all(|t| !t.contains("32") && !t.contains("36")),
        "{texts:?}"
    );
}

#[test]
fn out_of_place_length_mismatch_counts_elements() {
    local::run(1, |c| {
        let e = c
            .all_reduce_into(&[1f32; 9], &mut [0f32; 8], ReduceOp::Sum)
            .unwrap_err();
        assert!(e.to_string().contains("expected 9 elements, got 8"), "{e}");
        Ok(())
    })
    .unwrap();
}

#[test]
fn byte_lengths_that_are_not_whole_elements_say_bytes() {
    let e = Error::byte_lengths("message from rank 3", DType::F32, 32, 30);
    let t = e.to_string();
    assert!(
        t.contains("expected 32 bytes (8 elements), got 30 bytes"),
        "{t}"
    );
    let e = Error::byte_lengths("x", DType::F64, 64, 72);
    assert_eq!(e.to_string(), "x: expected 8 elements, got 9");
}

#[test]
fn cuda_and_mpi_errors_keep_the_library_code() {
    let e = Error::cuda_code(700, "launching dgc_select: CUDA_ERROR_ILLEGAL_ADDRESS");
    assert!(matches!(
        e,
        Error::Cuda {
            code: Some(700),
            ..
        }
    ));
    assert_eq!(
        e.to_string(),
        "CUDA: launching dgc_select: CUDA_ERROR_ILLEGAL_ADDRESS (error code 700)"
    );
    let e = Error::cuda("libnccl.so.2 could not be loaded");
    assert!(matches!(e, Error::Cuda { code: None, .. }));
    assert_eq!(e.to_string(), "CUDA: libnccl.so.2 could not be loaded");
    let e = Error::mpi_code(15, "MPI_Irecv failed: MPI_ERR_TRUNCATE: message truncated");
    assert!(matches!(e, Error::Mpi { code: Some(15), .. }));
    assert_eq!(
        e.to_string(),
        "MPI: MPI_Irecv failed: MPI_ERR_TRUNCATE: message truncated (MPI error code 15)"
    );
}

#[test]
fn user_errors_pass_through_a_run_closure_with_question_mark() {
    #[derive(Debug)]
    struct Diverged(f64);
    impl std::fmt::Display for Diverged {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "loss diverged to {}", self.0)
        }
    }
    impl std::error::Error for Diverged {}

    // rank 2 fails with its own error; ranks 0 and 1 then see it as a lost peer; `run` reports
    // rank 2's error, not rank 0's PeerLost
    let r = local::run_with(3, &quick(), |c| {
        if c.rank() == 2 {
            Err(Error::user(Diverged(f64::INFINITY)))?;
        }
        let mut v = [1f32; 4];
        c.all_reduce(&mut v, ReduceOp::Sum)?;
        Ok(v)
    });
    let e = r.unwrap_err();
    assert!(matches!(e, Error::User(_)), "{e:?}");
    assert_eq!(e.to_string(), "loss diverged to inf");
    let Error::User(inner) = e else {
        unreachable!()
    };
    assert!(inner.downcast_ref::<Diverged>().is_some());

    // `?` on I/O and parse errors needs no wrapping at all
    let r = local::run(2, |c| {
        let n: usize = "12".parse()?;
        if c.rank() == 1 {
            std::fs::read("/nonexistent/ferroccl/weights.bin")?;
        }
        Ok(n)
    });
    let e = r.unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    let r = local::run(1, |_| {
        let n: usize = "twelve".parse()?;
        Ok(n)
    });
    assert!(matches!(r, Err(Error::User(_))), "{r:?}");
    let r = local::run(1, |_| -> ferroccl::Result<()> {
        Err(Error::user("no data shard 3"))
    });
    assert_eq!(r.unwrap_err().to_string(), "no data shard 3");
}

#[test]
fn a_panic_is_reported_with_its_rank_and_message_not_as_peer_lost() {
    // ranks 0, 1, 3 propagate the PeerLost they get; run must still name rank 2 and its message
    let r = local::run_with(4, &quick(), |c| {
        let mut v = vec![1f32; 1000];
        c.all_reduce(&mut v, ReduceOp::Sum)?;
        if c.rank() == 2 {
            panic!("out of memory in layer {}", 7);
        }
        c.all_reduce(&mut v, ReduceOp::Sum)?;
        Ok(())
    });
    let e = r.unwrap_err();
    match &e {
        Error::RankPanicked { rank, message } => {
            assert_eq!(*rank, 2);
            assert_eq!(message, "out of memory in layer 7");
        }
        other => panic!("expected RankPanicked, got {other:?}"),
    }
    assert_eq!(e.to_string(), "rank 2 panicked: out of memory in layer 7");
}
