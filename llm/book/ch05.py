"""The book's own training functions, with its names, signatures and return values.

These are what a reader of the book calls; the pipeline's stages use `llm.trainer.Trainer`.
"""

from __future__ import annotations

from llm.generate import generate
from llm.losses import calc_loss_batch, calc_loss_loader
from llm.progress import progress_bar, write
from llm.tokenizer import text_to_token_ids, token_ids_to_text


def evaluate_model(model, train_loader, val_loader, device, eval_iter, precision: str = "fp32"):
    model.eval()
    train_loss = calc_loss_loader(train_loader, model, device, eval_iter, precision)
    val_loss = calc_loss_loader(val_loader, model, device, eval_iter, precision)
    model.train()
    return train_loss, val_loss


def generate_and_print_sample(model, tokenizer, device, start_context, max_new_tokens: int = 50):
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    token_ids = generate(model, encoded, max_new_tokens, context_size)
    print(token_ids_to_text(token_ids, tokenizer).replace("\n", " "))


def train_model_simple(
    model,
    train_loader,
    val_loader,
    optimizer,
    device,
    num_epochs,
    eval_freq,
    eval_iter,
    start_context,
    tokenizer,
    precision: str = "fp32",
    progress: bool = True,
):
    """The book's loop: returns (train_losses, val_losses, track_tokens_seen)."""
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        bar = progress_bar(train_loader, desc=f"epoch {epoch + 1}/{num_epochs}", disable=not progress)
        for input_batch, target_batch in bar:
            optimizer.zero_grad(set_to_none=True)
            loss = calc_loss_batch(input_batch, target_batch, model, device, precision)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter, precision)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
                write(f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        generate_and_print_sample(model, tokenizer, device, start_context)
    return train_losses, val_losses, track_tokens_seen
