#!/usr/bin/env bash
# Regenerate the README's figures (docs/figures/) from a 20-seed sweep of the visualize
# preset ("Visualizing the vanishing gradient problem"): sigmoid, tanh and ReLU.
#     bash docs/make_figures.sh            # from the repository root, vgrad installed
set -euo pipefail
cd "$(dirname "$0")/.."
sweep=outputs/sweeps/readme-visualize
python -m vgrad.train -m +experiment=visualize act=sigmoid,tanh,relu seeds=20 \
  progress=false hydra.sweep.dir="$sweep"
python scripts/plot_sweep.py "$sweep" --x act --out "$sweep/figures"
python scripts/report.py "$sweep"
out=docs/figures
mkdir -p "$out"
cp "$sweep/figures/profile_act.png" "$out/visualize_profile.png"
cp "$sweep/figures/bars_act.png" "$out/visualize_final_accuracy.png"
cp "$sweep/figures/curves_act.png" "$out/visualize_train_loss.png"
# Job folders 0, 1, 2 are sigmoid, tanh, relu (the sweep's order).
for job in 0:sigmoid 1:tanh 2:relu; do
  n=${job%%:*} act=${job#*:}
  python scripts/plot_run.py "$sweep/$n" --out "$sweep/$n/figures"
  cp "$sweep/$n/figures/gradients.png" "$out/visualize_${act}_gradients.png"
done
cp "$sweep/0/figures/weights.png" "$out/visualize_sigmoid_weights.png"
cp "$sweep/2/figures/saturation.png" "$out/visualize_relu_saturation.png"
# Theory beside measurement: He-initialised width-256 nets on standardised digits, where
# the mean-field prediction of delta at initialisation applies (sigmoid, tanh, ReLU).
theory=outputs/sweeps/readme-theory
python -m vgrad.train -m act=sigmoid,tanh,relu init=he_normal depth=8 width=256 data=digits \
  data.scale=standard loss=ce epochs=20 seeds=8 progress=false hydra.sweep.dir="$theory"
python scripts/plot_sweep.py "$theory" --x act --out "$theory/figures"
cp "$theory/figures/profile_act.png" "$out/theory_profile.png"
# Skip connections (residual_fix preset): plain vs residual vs ReZero, sigmoid, 30 blocks.
res=outputs/sweeps/readme-residual
python -m vgrad.train -m +experiment=residual_fix model.skip=false,true progress=false \
  hydra.sweep.dir="$res"
python -m vgrad.train +experiment=residual_fix model.alpha=rezero progress=false \
  hydra.run.dir="$res/2"
python scripts/plot_sweep.py "$res" --x model.skip --hue model.alpha --out "$res/figures"
cp "$res/figures/profile_model.alpha.png" "$out/residual_fix_profile.png"
python scripts/plot_run.py "$res/1" --out "$res/1/figures"
cp "$res/1/figures/signal.png" "$out/residual_fix_signal.png"
echo "figures in $out; the sweep's report: $sweep/report/index.html"
# Gradients through time (rnn_time preset): tanh RNN, LSTM and GRU at T = 50 and 100.
rnn=outputs/sweeps/readme-rnn-time
python -m vgrad.train -m +experiment=rnn_time model=rnn,lstm,gru data.length=50,100 \
  progress=false hydra.sweep.dir="$rnn"
python scripts/plot_sweep.py "$rnn" --x model --out "$rnn/figures"
cp "$rnn/figures/time_model.png" "$out/rnn_time_profile.png"
# Dynamical isometry (isometry preset): tanh at criticality and ReLU at sigma_w^2 = 2,
# orthogonal vs Gaussian kernels, depth 16 to 128, in one folder for one figure.
iso=outputs/sweeps/readme-isometry
python -m vgrad.train -m +experiment=isometry init.distribution=orthogonal,normal \
  depth=16,32,64,128 progress=false hydra.sweep.dir="$iso/tanh"
python -m vgrad.train -m +experiment=isometry act=relu init.sigma_w2=2.0 bias_init.sigma_b2=0.0 \
  init.distribution=orthogonal,normal depth=16,32,64,128 progress=false hydra.sweep.dir="$iso/relu"
python -c "
from vgrad.analysis import figures, tables, theory_figures
figures.save(theory_figures.isometry(tables.load_sweep('$iso')), '$out/isometry', ['png'])"
