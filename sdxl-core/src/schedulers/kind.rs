//! Choosing a scheduler family by diffusers class name or by the short names users type.

use std::fmt;
use std::str::FromStr;

use super::{
    ddim::Ddim, ddpm::Ddpm, dpm_solver::DpmSolverMultistep, euler::EulerDiscrete,
    euler_ancestral::EulerAncestralDiscrete, heun::HeunDiscrete, kdpm2::KDpm2Discrete, lcm::Lcm,
    lms::LmsDiscrete, unipc::UniPcMultistep, Scheduler, SchedulerConfig,
};
use crate::error::{Error, Result};

/// A sampler as users name it. Several names map to one diffusers class with different options
/// (the DPM-Solver++ variants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `EulerDiscreteScheduler` (`euler`).
    Euler,
    /// `EulerAncestralDiscreteScheduler` (`euler-a`).
    EulerAncestral,
    /// `DDIMScheduler` (`ddim`).
    Ddim,
    /// `DPMSolverMultistepScheduler`, dpmsolver++, order 2 (`dpmpp-2m`).
    DpmPp2M,
    /// `DPMSolverMultistepScheduler`, dpmsolver++, order 3 (`dpmpp-3m`).
    DpmPp3M,
    /// `DPMSolverMultistepScheduler`, sde-dpmsolver++, order 2 (`dpmpp-2m-sde`).
    DpmPp2MSde,
    /// `HeunDiscreteScheduler` (`heun`).
    Heun,
    /// `KDPM2DiscreteScheduler` (`kdpm2`).
    Kdpm2,
    /// `UniPCMultistepScheduler` (`unipc`).
    UniPc,
    /// `DDPMScheduler` (`ddpm`).
    Ddpm,
    /// `LCMScheduler` (`lcm`).
    Lcm,
    /// `LMSDiscreteScheduler` (`lms`).
    Lms,
}

impl SchedulerKind {
    /// Every kind, in the order the CLI lists them.
    pub const ALL: [SchedulerKind; 12] = [
        Self::Euler,
        Self::EulerAncestral,
        Self::Ddim,
        Self::DpmPp2M,
        Self::DpmPp3M,
        Self::DpmPp2MSde,
        Self::Heun,
        Self::Kdpm2,
        Self::UniPc,
        Self::Ddpm,
        Self::Lcm,
        Self::Lms,
    ];

    /// The short name (`euler`, `euler-a`, `dpmpp-2m`, …).
    pub fn name(self) -> &'static str {
        match self {
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::Ddim => "ddim",
            Self::DpmPp2M => "dpmpp-2m",
            Self::DpmPp3M => "dpmpp-3m",
            Self::DpmPp2MSde => "dpmpp-2m-sde",
            Self::Heun => "heun",
            Self::Kdpm2 => "kdpm2",
            Self::UniPc => "unipc",
            Self::Ddpm => "ddpm",
            Self::Lcm => "lcm",
            Self::Lms => "lms",
        }
    }

    /// The diffusers class implementing this kind.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::Ddim => "DDIMScheduler",
            Self::DpmPp2M | Self::DpmPp3M | Self::DpmPp2MSde => "DPMSolverMultistepScheduler",
            Self::Heun => "HeunDiscreteScheduler",
            Self::Kdpm2 => "KDPM2DiscreteScheduler",
            Self::UniPc => "UniPCMultistepScheduler",
            Self::Ddpm => "DDPMScheduler",
            Self::Lcm => "LCMScheduler",
            Self::Lms => "LMSDiscreteScheduler",
        }
    }

    /// The kind a config's `_class_name` names (DPM-Solver++ variants from its
    /// `algorithm_type`/`solver_order`).
    ///
    /// # Errors
    /// [`Error::Unsupported`] for a class this crate does not implement.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let class = config.class_name().unwrap_or("EulerDiscreteScheduler");
        let kind = match class {
            "DPMSolverMultistepScheduler" => {
                let values = config.values();
                let sde = values
                    .get("algorithm_type")
                    .and_then(|v| v.as_str())
                    .is_some_and(|a| a.starts_with("sde"));
                let order = values.get("solver_order").and_then(|v| v.as_u64());
                match (sde, order) {
                    (true, _) => Self::DpmPp2MSde,
                    (false, Some(3)) => Self::DpmPp3M,
                    _ => Self::DpmPp2M,
                }
            }
            other => Self::ALL
                .into_iter()
                .find(|k| k.class_name() == other)
                .ok_or_else(|| Error::unsupported(format!("scheduler class `{other}`")))?,
        };
        Ok(kind)
    }

    /// The overrides that select this kind's variant on top of a config.
    fn apply(self, config: SchedulerConfig) -> SchedulerConfig {
        let config = config.with("_class_name", self.class_name());
        match self {
            Self::DpmPp2M => config
                .with("algorithm_type", "dpmsolver++")
                .with("solver_order", 2),
            Self::DpmPp3M => config
                .with("algorithm_type", "dpmsolver++")
                .with("solver_order", 3),
            Self::DpmPp2MSde => config
                .with("algorithm_type", "sde-dpmsolver++")
                .with("solver_order", 2),
            _ => config,
        }
    }

    /// Builds this kind from `config` (the model's own scheduler config, possibly with
    /// overrides), like diffusers' `Cls.from_config(config)`.
    ///
    /// # Errors
    /// Invalid option values in the config.
    pub fn build(self, config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
        let cfg = self.apply(config.clone());
        Ok(match self {
            Self::Euler => Box::new(EulerDiscrete::from_config(&cfg)?),
            Self::EulerAncestral => Box::new(EulerAncestralDiscrete::from_config(&cfg)?),
            Self::Ddim => Box::new(Ddim::from_config(&cfg)?),
            Self::DpmPp2M | Self::DpmPp3M | Self::DpmPp2MSde => {
                Box::new(DpmSolverMultistep::from_config(&cfg)?)
            }
            Self::Heun => Box::new(HeunDiscrete::from_config(&cfg)?),
            Self::Kdpm2 => Box::new(KDpm2Discrete::from_config(&cfg)?),
            Self::UniPc => Box::new(UniPcMultistep::from_config(&cfg)?),
            Self::Ddpm => Box::new(Ddpm::from_config(&cfg)?),
            Self::Lcm => Box::new(Lcm::from_config(&cfg)?),
            Self::Lms => Box::new(LmsDiscrete::from_config(&cfg)?),
        })
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s || k.class_name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                Error::invalid(format!(
                    "unknown scheduler `{s}` (expected one of: {})",
                    names.join(", ")
                ))
            })
    }
}
