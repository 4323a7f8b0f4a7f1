//! # deepzero-core
//!
//! Zeroth-order training: gradients estimated from forward passes alone.
//!
//! ```
//! use deepzero_core::model::{Model, ModelSpec};
//! let model = Model::build(&ModelSpec::SimpleCnn { depth: 1, width: 18 }, [3, 32, 32], 10).unwrap();
//! assert_eq!(model.num_params(), 730);
//! ```

pub mod bounds;
pub mod checkpoint;
pub mod data;
pub mod distributed;
pub mod error;
pub mod estimator;
pub mod fast;
pub mod head;
pub mod layers;
pub mod layout;
pub mod model;
pub mod objective;
pub mod optim;
pub mod query;
pub mod seed;
pub mod sparsity;
pub mod task;
pub mod trainer;

pub use error::{Error, Result};
