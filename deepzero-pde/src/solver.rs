//! The [`Solver`] trait: one `step` is the core, rollouts are provided on top.

use crate::error::{Error, Result};

/// A time stepper `P` of a PDE on a fixed grid.
///
/// Requirements: `step` maps the state at step `step` (time `step · dt()`) to the next state,
/// is deterministic, and returns [`crate::Error::Cfl`] or [`crate::Error::NonFinite`] naming
/// `step` instead of producing a blown-up state. The provided rollouts call `step` only.
///
/// A correction `C` fits between steps: [`Solver::rollout_corrected`] computes
/// `s̃_{i+1} = correct(i + 1, P(s̃_i))`, where `correct` returns `P(s̃_i) + C(P(s̃_i))`.
pub trait Solver {
    /// The state type, e.g. a `[channel, y, x]` array.
    type State: Clone;

    /// The time step Δt.
    fn dt(&self) -> f64;

    /// Advances `state` from step `step` (time `step · dt()`) to step `step + 1`.
    fn step(&self, state: &Self::State, step: usize) -> Result<Self::State>;

    /// Runs `steps` steps from `initial` at step `start`; returns the `steps + 1` states,
    /// `initial` first.
    fn rollout(
        &self,
        initial: &Self::State,
        start: usize,
        steps: usize,
    ) -> Result<Vec<Self::State>> {
        self.rollout_corrected(initial, start, steps, |_, state| Ok(state))
    }

    /// Like [`Solver::rollout`], with `correct(step_index, P(s̃))` applied after every step;
    /// `step_index` is the index of the state being produced.
    fn rollout_corrected<C>(
        &self,
        initial: &Self::State,
        start: usize,
        steps: usize,
        mut correct: C,
    ) -> Result<Vec<Self::State>>
    where
        C: FnMut(usize, Self::State) -> Result<Self::State>,
    {
        let mut states = Vec::with_capacity(steps + 1);
        states.push(initial.clone());
        for step in start..start + steps {
            let predicted = self.step(&states[states.len() - 1], step)?;
            states.push(correct(step + 1, predicted)?);
        }
        Ok(states)
    }

    /// Runs `steps` steps from `initial` at step `start` and returns only the final state.
    fn advance(&self, initial: &Self::State, start: usize, steps: usize) -> Result<Self::State> {
        let mut state = initial.clone();
        for step in start..start + steps {
            state = self.step(&state, step)?;
        }
        Ok(state)
    }
}

/// The CFL check every solver runs before a step: `max_speed · dt / spacing` must not exceed
/// `limit`; the error names the step and suggests the time step that would pass.
pub fn check_cfl(step: usize, max_speed: f64, dt: f64, spacing: f64, limit: f64) -> Result<()> {
    let cfl = max_speed * dt / spacing;
    if cfl > limit {
        return Err(Error::Cfl {
            simulation: None,
            step,
            cfl,
            limit,
            max_speed,
            dt,
            suggested_dt: limit * spacing / max_speed,
        });
    }
    Ok(())
}
