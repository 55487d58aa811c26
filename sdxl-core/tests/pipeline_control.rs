//! The pipeline's control surface on the tiny fixture model: every scheduler family runs end to
//! end, progress is reported per step, previews are produced, and cancellation (from a token or
//! from the progress callback) stops the run with `Error::Cancelled`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sdxl_core::pipeline::{
    decode_images, text_to_image, CancelToken, Flow, GenerateParams, LoadOptions, RgbImage,
    RunControl, SdxlModel, StepInfo, StepObserver,
};
use sdxl_core::schedulers::SchedulerKind;
use sdxl_core::Error;

fn base() -> SdxlModel {
    SdxlModel::load(&common::base_dir(), &LoadOptions::default()).unwrap()
}

/// A small generation sized from the model's own VAE.
fn params(model: &SdxlModel, steps: usize) -> GenerateParams {
    let mut p = GenerateParams::new("a red fox in the snow");
    let f = model.vae_config().downscale_factor();
    p.width = 8 * f;
    p.height = 8 * f;
    p.steps = steps;
    p.seed = 3;
    p
}

#[derive(Default)]
struct Watch {
    steps: Vec<StepInfo>,
    previews: Vec<RgbImage>,
    stop_after: Option<usize>,
    cancel_after: Option<(usize, CancelToken)>,
}

impl StepObserver for Watch {
    fn on_step(&mut self, info: &StepInfo) -> Flow {
        self.steps.push(*info);
        if let Some((n, token)) = &self.cancel_after {
            if info.step == *n {
                token.cancel();
            }
        }
        match self.stop_after {
            Some(n) if info.step >= n => Flow::Stop,
            _ => Flow::Continue,
        }
    }

    fn wants_preview(&self) -> bool {
        true
    }

    fn on_preview(&mut self, _info: &StepInfo, preview: &RgbImage) {
        self.previews.push(preview.clone());
    }
}

#[test]
fn every_scheduler_generates_an_image() {
    let model = base();
    for kind in SchedulerKind::ALL {
        let mut p = params(&model, 4);
        p.scheduler.kind = Some(kind);
        let mut watch = Watch::default();
        let latents = text_to_image(&model, &p, None, RunControl::observing(&mut watch))
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
        let images = decode_images(&model, &latents).unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(
            (images[0].width, images[0].height),
            (p.width, p.height),
            "{kind}"
        );
        // Second-order samplers evaluate the model twice per step.
        assert!(
            watch.steps.len() >= 4,
            "{kind}: {} steps reported",
            watch.steps.len()
        );
        let last = watch.steps.last().unwrap();
        assert_eq!(last.step, last.total, "{kind}");
        println!("{kind}: {} model evaluations, ok", watch.steps.len());
    }
}

#[test]
fn previews_have_one_pixel_per_latent() {
    let model = base();
    let p = params(&model, 3);
    let mut watch = Watch::default();
    text_to_image(&model, &p, None, RunControl::observing(&mut watch)).unwrap();
    assert_eq!(watch.previews.len(), watch.steps.len());
    let f = model.vae_config().downscale_factor();
    assert_eq!(watch.previews[0].width, p.width / f);
}

#[test]
fn progress_callback_can_stop_the_run() {
    let model = base();
    let p = params(&model, 6);
    let mut watch = Watch {
        stop_after: Some(2),
        ..Watch::default()
    };
    let r = text_to_image(&model, &p, None, RunControl::observing(&mut watch));
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert_eq!(watch.steps.len(), 2);
}

#[test]
fn cancel_token_stops_between_steps() {
    let model = base();
    let p = params(&model, 6);
    let token = CancelToken::new();
    let mut watch = Watch {
        cancel_after: Some((3, token.clone())),
        ..Watch::default()
    };
    let r = text_to_image(
        &model,
        &p,
        None,
        RunControl {
            cancel: token,
            observer: &mut watch,
        },
    );
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert_eq!(watch.steps.len(), 3, "no step runs after the token is set");
}

#[test]
fn refiner_cannot_start_from_noise() {
    let refiner = SdxlModel::load(&common::refiner_dir(), &LoadOptions::default()).unwrap();
    let p = params(&refiner, 2);
    let r = text_to_image(&refiner, &p, None, RunControl::none());
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
}
