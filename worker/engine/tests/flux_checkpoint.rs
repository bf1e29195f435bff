//! Step checkpoints of the Flux pipeline: a generation interrupted after step k and resumed from
//! its checkpoint in another pipeline (another worker) gives the same image as an uninterrupted one.

use ditfleet_engine::checkpoint::LoopState;
use ditfleet_engine::flux::Pipeline;
use ditfleet_engine::{Control, Engine, EngineError, GenerateRequest, StepCheckpoint};

fn request() -> GenerateRequest {
    GenerateRequest {
        model: "flux-dev".into(),
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: None,
        width: 128,
        height: 128,
        steps: 7,
        guidance: 3.5,
        true_cfg_scale: 1.0,
        plan: None,
        seed: 11,
        scheduler: None,
        loras: Vec::new(),
    }
}

#[test]
fn tiny_flux_resumed_from_each_checkpoint_in_a_fresh_pipeline_gives_the_uninterrupted_image() {
    let r = request();
    let mut first = Pipeline::tiny_random(0).unwrap();
    let full = first.generate(&r, &mut |_| Control::Continue).unwrap();

    // Interrupted at step 5 with a checkpoint every 2 steps: checkpoints after steps 2, 4 and 5.
    let mut saved: Vec<StepCheckpoint> = Vec::new();
    let err = first
        .generate_resumable(&r, None, 2, &mut |c| saved.push(c), &mut |ev| {
            if ev.step == 5 {
                Control::Cancel
            } else {
                Control::Continue
            }
        })
        .unwrap_err();
    assert!(matches!(err, EngineError::Cancelled { step: 5 }), "{err}");
    assert_eq!(saved.iter().map(|c| c.step).collect::<Vec<_>>(), [2, 4, 5]);
    let state = LoopState::from_bytes(&saved[1].bytes).unwrap();
    assert_eq!(state.step, 4);
    assert_eq!(
        state.latents.size(),
        [1, 64, 64],
        "packed latents of a 128x128 image"
    );
    assert_eq!(state.scheduler.len(), 1, "the flow-matching scheduler's state");

    // Another worker: a fresh pipeline built from the same weights.
    let mut second = Pipeline::tiny_random(0).unwrap();
    for c in &saved {
        let mut steps = Vec::new();
        let resumed = second
            .generate_resumable(&r, Some(c), 2, &mut |_| {}, &mut |ev| {
                steps.push(ev.step);
                Control::Continue
            })
            .unwrap();
        assert_eq!(
            steps,
            ((c.step + 1)..=7).collect::<Vec<_>>(),
            "runs only the remaining steps"
        );
        assert!(
            resumed.rgb == full.rgb,
            "resumed from step {} differs from the uninterrupted image",
            c.step
        );
    }

    // A checkpoint of another plan (other size) or garbage is refused, not silently used.
    let mut other = request();
    other.width = 256;
    let e = second
        .generate_resumable(&other, Some(&saved[0]), 0, &mut |_| {}, &mut |_| {
            Control::Continue
        })
        .unwrap_err();
    assert!(matches!(e, EngineError::BadCheckpoint(_)), "{e}");
    let garbage = StepCheckpoint {
        step: 2,
        bytes: b"not safetensors".to_vec(),
    };
    let e = second
        .generate_resumable(&r, Some(&garbage), 0, &mut |_| {}, &mut |_| Control::Continue)
        .unwrap_err();
    assert!(matches!(e, EngineError::BadCheckpoint(_)), "{e}");
}
