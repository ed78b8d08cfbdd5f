"""runs.worker_id, lease_expires_at, fence: which worker holds a run, until when, under which claim

Revision ID: 0003
Revises: 0002
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMNs (SQLite allows them, nullable or with a default): no copy of the runs
    # table. Runs in flight during the upgrade have no lease: the reaper takes them as expired.
    op.add_column('runs', sa.Column('worker_id', sa.String(length=64), nullable=True))
    op.add_column('runs', sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('runs', sa.Column('fence', sa.Integer(), server_default=sa.text('0'), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('runs') as batch_op:
        batch_op.drop_column('fence')
        batch_op.drop_column('lease_expires_at')
        batch_op.drop_column('worker_id')
