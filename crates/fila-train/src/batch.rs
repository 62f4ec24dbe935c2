//! A fila-data `Batch` as the model's `FilaInput`.

use burn::prelude::*;
use burn::tensor::TensorData;
use fila_data::{Batch, PixelTensor};
use fila_model::cvfm::TileGrid;
use fila_model::fila::{FilaInput, ScoredRows};
use fila_model::hybrid_encoder::ImageInput;

/// Label positions that count in the loss ([`ScoredRows`]).
pub fn scored_tokens(batch: &Batch) -> usize {
    ScoredRows::from_labels(&batch.labels, batch.seq_len).len()
}

fn tensor4<B: Backend>(data: &[f32], shape: [usize; 4], device: &B::Device) -> Tensor<B, 4> {
    Tensor::from_data(TensorData::new(data.to_vec(), shape), device)
}

/// One image's views (`[views, 3, t, t]`), ConvNeXt input (`[3, H, W]`) and canvas as the model
/// takes them.
pub fn image_input<B: Backend>(
    views: &[f32],
    view_shape: [usize; 4],
    hires: &PixelTensor,
    grid: Option<fila_data::TileGrid>,
    device: &B::Device,
) -> ImageInput<B> {
    let grid = match grid {
        Some(g) => TileGrid::tiled(g.rows as usize, g.cols as usize),
        None => TileGrid::untiled(),
    };
    ImageInput {
        views: tensor4(views, view_shape, device),
        hires: Some(tensor4(&hires.data, [1, hires.shape[0], hires.shape[1], hires.shape[2]], device)),
        grid,
    }
}

pub fn to_input<B: Backend>(batch: &Batch, device: &B::Device) -> FilaInput<B> {
    let [b, t] = [batch.batch_size, batch.seq_len];
    let input_ids = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.input_ids.clone(), [b, t]), device);
    let labels = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.labels.clone(), [b, t]), device);
    let mask: Vec<f32> = batch.attention_mask.iter().map(|&m| if m { 1.0 } else { 0.0 }).collect();
    let attention_mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [b, t]), device);
    let PixelTensor { data: views, shape } = &batch.views;
    let side = shape[2];
    let view_len = 3 * side * side;
    let mut first_view = 0;
    let images = batch
        .views_per_image
        .iter()
        .zip(&batch.hires)
        .zip(&batch.grids)
        .map(|((&v, hires), grid)| {
            let slice = &views[first_view * view_len..(first_view + v) * view_len];
            first_view += v;
            image_input(slice, [v, 3, side, side], hires, *grid, device)
        })
        .collect();
    FilaInput { input_ids, attention_mask, labels: Some(labels), images }
}
